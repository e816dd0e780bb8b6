"""Conversational JSONL: read with validation (errors name file and line), write atomically.

A row is `{"messages": [{"role": "user"|"assistant", "content": str}, ...], ...}`; other keys (task,
answer, ...) ride along as metadata for verifiers and reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

from ..chat import validate_roles
from ..manifest import temp_file_beside


class DataError(ValueError):
    """A malformed row, reported with its file and line."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-empty line; raise DataError on invalid JSON."""
    path = Path(path)
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def check_conversation(row: dict, need_final_assistant: bool = True) -> None:
    """Raise ValueError unless `row['messages']` is a valid Gemma conversation with content."""
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        raise ValueError("missing 'messages' list")
    validate_roles(msgs)
    for i, m in enumerate(msgs):
        if not m["content"].strip():
            raise ValueError(f"message {i} ({m['role']}): empty content")
    if need_final_assistant and msgs[-1]["role"] != "assistant":
        raise ValueError("conversation must end with an assistant turn")


def read_conversations(
    path: str | Path,
    on_error: Literal["raise", "skip"] = "raise",
    need_final_assistant: bool = True,
    skipped: Optional[list] = None,
) -> list[dict]:
    """Load and validate a conversational JSONL file.

    on_error='raise' stops at the first bad row naming file:line; 'skip' drops it and appends
    (line, reason) to `skipped` so the caller can count it in a report.
    """
    return [row for _, row in iter_conversations(path, on_error, need_final_assistant, skipped)]


def iter_conversations(
    path: str | Path,
    on_error: Literal["raise", "skip"] = "raise",
    need_final_assistant: bool = True,
    skipped: Optional[list] = None,
) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each valid conversation, as `read_conversations` reads them; callers that
    check more columns use the line number in their own errors."""
    for lineno, obj in iter_jsonl(path):
        try:
            check_conversation(obj, need_final_assistant)
        except ValueError as err:
            if on_error == "raise":
                raise DataError(f"{path}:{lineno}: {err}") from None
            if skipped is not None:
                skipped.append((lineno, str(err)))
            continue
        yield lineno, obj


def json_value(value: Any) -> Any:
    """json.dumps' fallback for the values data sets hold that JSON has no type for: dates and times as ISO
    8601 text (Parquet and Arrow timestamp columns), anything else (Decimal, ...) as its str()."""
    iso = getattr(value, "isoformat", None)
    return iso() if callable(iso) else str(value)


def write_jsonl(path: str | Path, rows: Iterable[dict], default: Callable[[Any], Any] = json_value) -> int:
    """Write rows to `path` atomically (temp file + rename); return the row count. `default` is json.dumps'
    fallback for values JSON has no type for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=default) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def prompt_of(row: dict) -> list[dict]:
    """The conversation up to (not including) the final assistant turn."""
    msgs = row["messages"]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
