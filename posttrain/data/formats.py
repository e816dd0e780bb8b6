"""The row layouts chat data comes in, and their conversion to our canonical rows. Pure functions.

Canonical rows, what every stage reads:
- a conversation: `{"messages": [{"role": "user"|"assistant", "content": str}, ...], **metadata}`; roles
  alternate starting with the user; a prompt-only row ends on the user turn;
- a preference pair: `{"chosen": [...], "rejected": [...], **metadata}`, two whole conversations (prompt
  included) that end on the assistant's answer and share every turn before it (what the prefs stage writes).

Columns a layout does not use ride along as metadata (`task`, `answer`, `margin`, ...), except missing
values: a null (or NaN, as a Parquet float column holds, or an empty CSV cell) is left out of the row, so a row
with `"answer": null` is a row without an oracle answer wherever a stage asks whether it has one. A row that
does not fit raises RowError naming the column and what was expected; the caller adds file and row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Literal, Optional

from ..chat import validate_roles

Kind = Literal["conversation", "prompt", "preference"]
SystemMode = Literal["fold", "drop", "error"]


@dataclass(frozen=True)
class Layout:
    """One format: the columns it needs, the ones it may use, and what its rows become."""

    name: str
    kind: Literal["conversation", "preference"]
    """What a row becomes: a conversation or a preference pair."""
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    doc: str = ""

    @cached_property
    def columns(self) -> frozenset[str]:
        """Every column the layout consumes (the rest is metadata); a set, as it is tested once per column."""
        return frozenset(self.required + self.optional)


FORMATS: dict[str, Layout] = {
    f.name: f
    for f in [
        Layout("messages", "conversation", ("messages",), doc="OpenAI-style messages with role and content"),
        Layout("sharegpt", "conversation", ("conversations",), doc="ShareGPT: conversations with from and value"),
        Layout(
            "alpaca",
            "conversation",
            ("instruction", "output"),
            ("input",),
            doc="Alpaca: instruction, optional input (joined by a blank line), output",
        ),
        Layout(
            "prompt_completion",
            "conversation",
            ("prompt", "completion"),
            doc="prompt and completion, strings or message lists",
        ),
        Layout("prompt", "conversation", ("prompt",), doc="prompt only, a string or messages ending on a user turn"),
        Layout(
            "preference",
            "preference",
            ("chosen", "rejected"),
            ("prompt",),
            doc="prompt plus chosen/rejected answers or whole conversations",
        ),
        Layout(
            "hh",
            "preference",
            ("chosen", "rejected"),
            doc="Anthropic HH: chosen/rejected transcripts of Human: and Assistant: turns",
        ),
    ]
}
"""Every format, by the name a source's `format` key takes."""

FORMAT_NAMES = tuple(FORMATS)
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "system": "system",
}
"""Role names accepted in message lists (OpenAI `role` and ShareGPT `from`), lower-cased, -> our role."""
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


class FormatError(ValueError):
    """The columns fit no format, or several; or the format does not give what the reader needs."""


class RowError(ValueError):
    """One row does not fit its format: `column` is where, `reason` a short label for counting."""

    def __init__(self, column: Optional[str], message: str, reason: str):
        super().__init__(message)
        self.column, self.message, self.reason = column, message, reason


# ----------------------------------------------------------------------------------------------
# Detection


def kinds_for(kind: Optional[Kind]) -> tuple[str, ...]:
    """The layout kinds a reader of `kind` accepts (None: any)."""
    if kind is None:
        return ("conversation", "preference")
    return ("preference",) if kind == "preference" else ("conversation",)


def detect_format(columns: Iterable[str], kind: Optional[Kind] = None, first_row: Optional[dict] = None) -> str:
    """The one format whose columns are present, among those a reader of `kind` accepts.

    `prompt` is the fallback: a `prompt` column next to another layout's columns is usually that
    layout's first user turn (UltraChat keeps one beside `messages`). `chosen`/`rejected` without a
    `prompt` column are HH transcripts when the first row's `chosen` is a string, whole conversations
    otherwise. Raises FormatError listing the candidates when several fit, the formats when none does.
    """
    cols = set(columns)
    fits = [f.name for f in FORMATS.values() if f.kind in kinds_for(kind) and set(f.required) <= cols]
    if len(fits) > 1 and "prompt" in fits:
        fits.remove("prompt")
    if "preference" in fits and "hh" in fits:
        transcripts = "prompt" not in cols and isinstance((first_row or {}).get("chosen"), str)
        fits.remove("preference" if transcripts else "hh")
    if len(fits) == 1:
        return fits[0]
    if fits:
        kinds = {FORMATS[f].kind for f in fits}
        named = [f"{f} (a {FORMATS[f].kind} row)" if len(kinds) > 1 else f for f in fits]
        raise FormatError(
            f"the columns fit several formats: {', '.join(named)}; set format to one of them"
            + (" (stages that read pairs, rm and dpo, take the preference one themselves)" if len(kinds) > 1 else "")
        )
    wanted = "; ".join(
        f"{f.name} ({', '.join(f.required)}{''.join(f'[, {c}]' for c in f.optional)})"
        for f in FORMATS.values()
        if f.kind in kinds_for(kind)
    )
    raise FormatError(
        f"no known format has these columns; formats and the columns they need: {wanted}. "
        f"Set format, and columns to rename yours (e.g. {{question: prompt}})"
    )


def check_format(name: str, kind: Optional[Kind], need_final_assistant: bool = False) -> Layout:
    """The layout `name`, or FormatError if a reader of `kind` cannot use it."""
    layout = FORMATS[name]
    if layout.kind not in kinds_for(kind):
        takes = [f.name for f in FORMATS.values() if f.kind in kinds_for(kind)]
        what = "preference pairs" if kind == "preference" else "conversations or prompts"
        raise FormatError(
            f"format {name!r} gives {layout.kind}s, but this input needs {what} (formats {', '.join(takes)})"
        )
    if name == "prompt" and kind == "conversation" and need_final_assistant:
        raise FormatError(
            "format 'prompt' has prompts only, but this input needs conversations that end with an assistant answer"
        )
    return layout


# ----------------------------------------------------------------------------------------------
# Conversion


def to_canonical(
    row: dict, fmt: str, kind: Optional[Kind] = None, system: SystemMode = "fold", need_final_assistant: bool = True
) -> dict:
    """One row (columns already renamed) of format `fmt` -> the canonical row a reader of `kind` gets.

    kind 'conversation' keeps the whole conversation (`need_final_assistant`: it must end on an answer);
    'prompt' drops a final assistant turn; 'preference' gives a pair; None follows the format. The format
    must suit `kind` (`check_format`, once per source).
    """
    layout = FORMATS[fmt]
    missing = [c for c in layout.required if c not in row]
    if missing:  # the format was detected from other rows: this one lacks what it needs
        raise RowError(missing[0], f"missing column(s) {missing} that format {fmt!r} needs", "missing column")
    consumed = layout.columns
    meta = {k: v for k, v in row.items() if k not in consumed and not _missing(v)}
    if layout.kind == "preference":
        chosen, rejected = _PAIRS[fmt](row, system)
        _check_pair(chosen, rejected, row)
        meta.pop("messages", None)  # a conversation column beside the pair (UltraFeedback) is not the pair
        return {"chosen": chosen, "rejected": rejected, **meta}
    column = layout.required[0]
    msgs = _system(_CONVERSATIONS[fmt](row), system, column)
    if kind == "prompt" and fmt != "prompt" and msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    _check_turns(msgs, column)
    if kind == "prompt" or fmt == "prompt":
        if msgs[-1]["role"] != "user":
            raise RowError(column, "a prompt must end with a user turn", "prompt does not end on a user turn")
    elif kind == "conversation" and need_final_assistant and msgs[-1]["role"] != "assistant":
        raise RowError(column, "conversation must end with an assistant turn", "no final assistant turn")
    meta.pop("chosen", None)  # a pair beside the conversation (UltraFeedback) is not this row's content
    meta.pop("rejected", None)
    return {"messages": msgs, **meta}


def _missing(value) -> bool:
    """A metadata value that stands for "no value": null, or NaN (JSON has no NaN; pandas writes it for null)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _kind_of(value) -> str:
    return "null" if value is None else type(value).__name__


def _text(value, column: str, where: str) -> str:
    """A message's text: a string, or OpenAI content parts of type text, one per line (as vLLM's chat
    renderer joins them, vllm/renderers/chat_utils.py: with no separator, "Part A" "Part B" would read as
    one word)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {p.get("type") for p in value}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in value):
            return "\n".join(p["text"] for p in value)
        raise RowError(
            column,
            f"{where}: content parts of type {sorted(map(str, kinds - {'text'}))}: only text is supported",
            "non-text content",
        )
    raise RowError(column, f"{where}: expected string content, got {_kind_of(value)}", "content not a string")


def _turns(value, column: str, role_key: str = "role", text_key: str = "content") -> list[dict]:
    """A list of message objects -> [{"role", "content"}] with roles mapped (system kept for `_system`)."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _kind_of(value)
        raise RowError(column, f"expected a non-empty list of messages, got {got}", "not a list of messages")
    keys = ("from", "value") if role_key == "from" else ("role", "content")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise RowError(
                column,
                f"message {i}: expected an object with {role_key!r} and {text_key!r}, got "
                f"{sorted(m) if isinstance(m, dict) else _kind_of(m)}",
                "malformed message",
            )
        role = ROLES.get(m[role_key].lower()) if isinstance(m[role_key], str) else None
        if role is None:
            raise RowError(
                column,
                f"message {i}: unknown {keys[0]} {m[role_key]!r}, expected one of {', '.join(ROLES)}",
                f"unknown {keys[0]}",
            )
        out.append({"role": role, "content": _text(m[text_key], column, f"message {i}")})
    return out


def _system(msgs: list[dict], mode: SystemMode, column: str) -> list[dict]:
    """Apply the system-turn policy. The Gemma format has no system role: 'fold' prepends the system text
    to the next user turn, followed by a blank line."""
    if not any(m["role"] == "system" for m in msgs):
        return msgs
    if mode == "error":
        i = next(i for i, m in enumerate(msgs) if m["role"] == "system")
        raise RowError(column, f"message {i}: a system turn (system: error; set system to fold or drop)", "system turn")
    if mode == "drop":
        return [m for m in msgs if m["role"] != "system"]
    out, pending = [], []
    for m in msgs:
        if m["role"] == "system":
            pending.append(m["content"])
            continue
        if pending:
            if m["role"] != "user":
                raise RowError(
                    column,
                    "a system turn must come before a user turn to be folded into it",
                    "system turn before an assistant turn",
                )
            m, pending = {"role": "user", "content": "\n\n".join(pending + [m["content"]])}, []
        out.append(m)
    if pending:
        raise RowError(column, "a system turn with no user turn after it", "system turn at the end")
    return out


def _check_turns(msgs: list[dict], column: str) -> None:
    try:
        validate_roles(msgs)
    except ValueError as err:
        raise RowError(column, str(err), re.sub(r"^message \d+: ", "", str(err))) from None
    for i, m in enumerate(msgs):
        if not m["content"].strip():
            raise RowError(column, f"message {i} ({m['role']}): empty content", "empty content")


def _string(row: dict, column: str, optional: bool = False) -> str:
    """A string column; empty only if optional (then None reads as empty too). Named here, not as a message."""
    value = row.get(column)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(column, f"expected a string, got {_kind_of(value)}", "not a string")
    if not optional and not value.strip():
        raise RowError(column, "empty string", "empty content")
    return value


def _side(value, column: str, role: str) -> list[dict]:
    """A prompt or completion column: a string is one turn of `role`, a list is messages."""
    if value is None:  # Parquet null, or an empty CSV cell
        raise RowError(column, "null: no text", "empty content")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(column, "empty string", "empty content")
        return [{"role": role, "content": value}]
    return _turns(value, column)


def normalise_messages(value, system: SystemMode = "fold") -> list[dict]:
    """A `messages` value -> [{"role", "content"}]: role aliases mapped, text parts joined, system turns per
    `system`; RowError if it cannot be read. Turn order and empty turns are not judged (the filter counts them).
    A value already in that form is returned as it is (the filter's common case, checked at a third of the cost)."""
    if isinstance(value, list) and value and all(_plain_turn(m) for m in value):
        return value
    return _system(_turns(value, "messages"), system, "messages")


def _plain_turn(m) -> bool:
    return type(m) is dict and len(m) == 2 and m.get("role") in ("user", "assistant") and type(m.get("content")) is str


def _messages(row: dict) -> list[dict]:
    return _turns(row["messages"], "messages")


def _sharegpt(row: dict) -> list[dict]:
    return _turns(row["conversations"], "conversations", "from", "value")


def _alpaca(row: dict) -> list[dict]:
    instruction, extra = _string(row, "instruction"), _string(row, "input", optional=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _string(row, "output")}]


def _prompt_completion(row: dict) -> list[dict]:
    completion = row["completion"]
    if _hh_prompt(row["prompt"]) and isinstance(completion, str):
        completion = completion.strip()
    return _prompt(row) + _side(completion, "completion", "assistant")


def _prompt(row: dict) -> list[dict]:
    return _hh_prompt(row["prompt"]) or _side(row["prompt"], "prompt", "user")


_CONVERSATIONS = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "prompt": _prompt,
}


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["role"] == y["role"] and x["content"].strip() == y["content"].strip() for x, y in zip(a, b)
    )


def _preference(row: dict, system: SystemMode) -> tuple[list[dict], list[dict]]:
    """prompt (string, HH transcript, messages or absent) + chosen/rejected (answers, or conversations that may
    repeat the prompt turns: UltraFeedback does, others don't)."""
    value = row.get("prompt")
    transcript = _hh_prompt(value)
    prompt = transcript or ([] if value is None else _side(value, "prompt", "user"))
    asked = [m for m in prompt if m["role"] != "system"]
    sides = []
    for column in ("chosen", "rejected"):
        value = row[column]
        if isinstance(value, str):
            if not prompt:
                raise RowError(
                    column,
                    "a string answer needs a 'prompt' column (or give whole conversations as lists of messages)",
                    "string answer without a prompt",
                )
            answer = (
                value.strip() if transcript else value
            )  # rm-static's answers open with the space after "Assistant:"
            turns = prompt + [{"role": "assistant", "content": answer}]
        else:
            turns = _turns(value, column)
            said = [m for m in turns if m["role"] != "system"]  # a system turn of its own does not hide a repeat
            if asked and not _same(said[: len(asked)], asked):
                if said[:1] and said[0]["role"] == "user":
                    raise RowError(
                        column,
                        f"{column!r} is a whole conversation but its prompt turns differ from the 'prompt' column",
                        "prompt does not match chosen/rejected",
                    )
                turns = prompt + turns
        sides.append(_system(turns, system, column))
    return sides[0], sides[1]


def _hh_prompt(value) -> Optional[list[dict]]:
    """The turns of a prompt column that holds an HH transcript ending on an open 'Assistant:' turn (the layout of
    Dahoas/rm-static), or None for any other prompt."""
    if (
        not isinstance(value, str)
        or not value.lstrip().startswith("Human:")
        or not value.rstrip().endswith("Assistant:")
    ):
        return None
    turns = _hh_turns("\n\n" + value.strip(), "prompt")
    return turns[:-1] if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"] else None


def _hh_turns(value, column: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' (any number of turns) -> messages; a list is taken as messages."""
    if not isinstance(value, str):
        return _turns(value, column)
    parts = _HH_TURN.split(value)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(
            column,
            f"expected a transcript of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns, got {value[:60]!r}",
            "not an HH transcript",
        )
    return [
        {"role": "user" if who == "Human" else "assistant", "content": text.strip()}
        for who, text in zip(parts[1::2], parts[2::2])
    ]


def _hh(row: dict, system: SystemMode) -> tuple[list[dict], list[dict]]:
    return (
        _system(_hh_turns(row["chosen"], "chosen"), system, "chosen"),
        _system(_hh_turns(row["rejected"], "rejected"), system, "rejected"),
    )


_PAIRS = {"preference": _preference, "hh": _hh}


def _check_pair(chosen: list[dict], rejected: list[dict], row: dict) -> None:
    """Both sides whole conversations ending on the answer, with the same turns before it (rm's contract)."""
    for column, msgs in (("chosen", chosen), ("rejected", rejected)):
        _check_turns(msgs, column)
        if msgs[-1]["role"] != "assistant":
            raise RowError(column, f"{column!r} must end with an assistant turn", "no final assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("rejected", "'chosen' and 'rejected' must share the same prompt turns", "prompts differ")
    if _same(chosen[-1:], rejected[-1:]):
        raise RowError("rejected", "'chosen' and 'rejected' give the same answer: it prefers nothing", "same answer")
    if "margin" in row and (isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float))):
        raise RowError("margin", f"'margin' must be a number, got {row['margin']!r}", "margin not a number")
