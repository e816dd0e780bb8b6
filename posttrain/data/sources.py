"""Reading data sources into canonical rows: what stages call instead of opening files themselves.

    rows = read_rows(inp["train_data"], "conversation", seed=ctx.seed)      # a list
    for where, row in iter_rows(inp["prefs_train"], "preference"): ...      # a stream: flat memory

A source is a path, a mapping (`SourceSpec`) or a list of mappings with weights (a mixture), as a config
or a stage's inputs hold it. Each row is converted to the canonical form (`formats.py`); a row that does
not fit stops the read with an error naming file, row, column and the columns found, or with
`on_error: skip` is dropped and counted in a SkipReport.

A mixture draws each next row from source i with probability weight_i / sum(weights), with a
`random.Random` seeded by the reader's `seed` (the pipeline seed), and ends when any source runs out: every
stretch of the output keeps the shares. `limit` caps a source; an entry's own `seed` shuffles it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from .conversations import DataError, write_jsonl
from .formats import FORMATS, FormatError, Kind, RowError, check_format, detect_format, to_canonical
from .readers import BATCH, BadRow, DataFile, Loc, Raw, open_source_files
from .spec import SourceSpec, as_specs

log = logging.getLogger("posttrain")
_DETECT_ROWS = 100
"""Rows looked at for the first readable one, whose columns decide the format."""


class SkipReport:
    """Rows read and skipped (`on_error: skip`), per reason, with the first few as examples."""

    def __init__(self, max_examples: int = 5):
        self.read = self.skipped = 0
        self.reasons: Counter = Counter()
        self.examples: list[dict] = []
        self.max_examples = max_examples

    def add(self, where: Loc, reason: str, error: str) -> None:
        """Count one skipped row under `reason`; keep its full error as an example while there is room."""
        self.skipped += 1
        self.reasons[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"where": str(where), "reason": reason, "error": error})

    def as_dict(self) -> dict:
        """The report as JSON: counts, reasons (most frequent first) and examples."""
        return {
            "read": self.read,
            "kept": self.read - self.skipped,
            "skipped": self.skipped,
            "reasons": dict(self.reasons.most_common()),
            "examples": self.examples,
        }


def row_error(
    where: Loc,
    message: str,
    column: Optional[str] = None,
    columns: Optional[list] = None,
    renamed_from: Optional[str] = None,
) -> str:
    """An error line naming file and row (and line), the column at fault and the columns the row has."""
    extras = [f"row {where.row}"] if where.line is not None else []
    if column:
        extras.append(f"column {column!r}" + (f" (renamed from {renamed_from!r})" if renamed_from else ""))
    if columns is not None:
        extras.append(f"columns found: {', '.join(map(str, columns)) or 'none'}")
    return f"{where}: {message}" + (f" ({'; '.join(extras)})" if extras else "")


@dataclass
class OpenedSource:
    """One source opened and checked: its files, format and the reader's expectations."""

    spec: SourceSpec
    files: list[DataFile]
    format: str
    kind: Optional[Kind]
    need_final_assistant: bool


def _renamed(row: dict, renames: dict[str, str]) -> dict:
    if not renames:
        return row
    return {renames.get(k, k): v for k, v in row.items()}


def _first_row(spec: SourceSpec, files: list[DataFile]) -> dict:
    """The first readable row (for its columns); a bad one before it stops the read unless skipped."""
    seen = 0
    for f in files:
        for where, raw in itertools.islice(f.rows(), _DETECT_ROWS):
            seen += 1
            if isinstance(raw, dict):
                return raw
            if spec.on_error == "raise":
                raise DataError(row_error(where, raw.message))
    raise DataError(f"{spec.path}: no rows" if not seen else f"{spec.path}: none of the first {seen} rows is readable")


def open_source(
    spec: SourceSpec, kind: Optional[Kind] = "conversation", need_final_assistant: bool = True
) -> OpenedSource:
    """Open a source's files, check its renames and settle its format (named, or detected from the columns)."""
    files = open_source_files(spec.path, spec.split)
    first = _first_row(spec, files)
    columns = list(first)
    where = files[0].name
    for old, new in spec.columns.items():
        if old not in columns:
            raise DataError(f"{where}: columns: no column {old!r} to rename (columns found: {', '.join(columns)})")
        if new in columns and new not in spec.columns:
            raise DataError(f"{where}: columns: renaming {old!r} to {new!r} would replace the existing column {new!r}")
    renamed = _renamed(first, spec.columns)
    try:
        fmt = spec.format or detect_format(renamed, kind, renamed)
        check_format(fmt, kind, need_final_assistant)
    except FormatError as err:
        raise DataError(f"{where}: {err}{_other_kind(renamed, kind)} (columns found: {', '.join(renamed)})") from None
    return OpenedSource(spec, files, fmt, kind, need_final_assistant)


def _other_kind(row: dict, kind: Optional[Kind]) -> str:
    """A hint when the columns fit a format of the other kind (pairs given where conversations are read)."""
    try:
        fmt = detect_format(row, None, row)
    except FormatError:
        return ""
    other = FORMATS[fmt].kind
    if kind is None or (other == "preference") == (kind == "preference"):
        return ""
    gives = "preference pairs" if other == "preference" else "conversations"
    return f"; the columns fit format {fmt!r}, which gives {gives}"


def _shuffled(files: list[DataFile], seed: int) -> Iterator[Raw]:
    """All rows of the files in one seeded random order, fetched a batch of positions at a time."""
    sizes = [f.num_rows() for f in files]
    starts = np.cumsum([0] + sizes)
    order = np.random.default_rng(seed).permutation(int(starts[-1]))
    for lo in range(0, len(order), BATCH):
        chunk = order[lo : lo + BATCH]
        owner = np.searchsorted(starts, chunk, side="right") - 1
        got: dict[int, Raw] = {}
        for i in np.unique(owner).tolist():
            positions = chunk[owner == i]
            for pos, raw in zip(positions.tolist(), files[i].take((positions - starts[i]).tolist())):
                got[pos] = raw
        for pos in chunk.tolist():
            yield got[pos]


def source_rows(src: OpenedSource, report: SkipReport) -> Iterator[tuple[Loc, dict]]:
    """(where, canonical row) for each row of an opened source, in file order or shuffled by its seed."""
    spec = src.spec
    raws = (
        _shuffled(src.files, spec.seed)
        if spec.seed is not None
        else itertools.chain.from_iterable(f.rows() for f in src.files)
    )
    read = kept = 0
    for where, raw in raws:
        read += 1
        report.read += 1
        if isinstance(raw, BadRow):
            reason, error = raw.reason, row_error(where, raw.message)
        else:
            try:
                row = to_canonical(
                    _renamed(raw, spec.columns), src.format, src.kind, spec.system, src.need_final_assistant
                )
            except RowError as err:
                origin = next((old for old, new in spec.columns.items() if new == err.column), None)
                reason, error = err.reason, row_error(where, err.message, err.column, list(raw), origin)
            else:
                kept += 1
                yield where, row
                if spec.limit is not None and kept >= spec.limit:
                    return
                continue
        if spec.on_error == "raise":
            raise DataError(error)
        report.add(where, reason, error)
    if not read:
        raise DataError(f"{spec.path}: no rows")
    if not kept:
        raise DataError(
            f"{spec.path}: no usable rows: all {read} were skipped "
            f"({dict(report.reasons.most_common(3))}); "
            f"first: {report.examples[0]['error'] if report.examples else '?'}"
        )


def _mixture(streams: list[Iterator], weights: list[float], seed: int) -> Iterator:
    """Draw from stream i with probability weights[i] / sum; stop when the drawn stream runs out."""
    rng = random.Random(f"mixture-{seed}")
    bounds = list(itertools.accumulate(weights))
    while True:
        i = bisect.bisect_right(bounds, rng.random() * bounds[-1])
        item = next(streams[min(i, len(streams) - 1)], None)
        if item is None:
            return
        yield item


def iter_rows(
    source,
    kind: Optional[Kind] = "conversation",
    *,
    need_final_assistant: bool = True,
    skipped: Optional[SkipReport] = None,
    seed: int = 0,
    on_error: Optional[Literal["raise", "skip"]] = None,
) -> Iterator[tuple[Loc, dict]]:
    """Stream (where, canonical row) from a source; `where` names file and row for the caller's own errors.

    kind: 'conversation' ({"messages"}; `need_final_assistant`: each must end on an answer), 'prompt'
    ({"messages"} ending on the user turn), 'preference' ({"chosen", "rejected"}), or None (what the format
    gives). `skipped` collects the rows `on_error: skip` drops; `seed` seeds a mixture's draws; `on_error`
    sets the policy of each source that does not set its own (a plain path, or a mapping without `on_error`).
    Sources are opened and their formats settled before this returns, so a wrong path or format fails at once.
    """
    specs = as_specs(source)
    if on_error is not None:
        specs = [s if "on_error" in s.model_fields_set else s.model_copy(update={"on_error": on_error}) for s in specs]
    opened = [open_source(s, kind, need_final_assistant) for s in specs]
    report = skipped if skipped is not None else SkipReport()
    streams = [source_rows(o, report) for o in opened]
    rows = streams[0] if len(streams) == 1 else _mixture(streams, [s.weight or 1.0 for s in specs], seed)
    return _logged(rows, report, specs)


def _logged(rows: Iterator, report: SkipReport, specs: list[SourceSpec]) -> Iterator:
    yield from rows
    if report.skipped:
        log.warning(
            "data %s: skipped %d of %d rows (%s)",
            ", ".join(s.path for s in specs),
            report.skipped,
            report.read,
            ", ".join(f"{r}: {n}" for r, n in report.reasons.most_common(5)),
        )


def read_rows(
    source,
    kind: Optional[Kind] = "conversation",
    *,
    need_final_assistant: bool = True,
    skipped: Optional[SkipReport] = None,
    seed: int = 0,
    on_error: Optional[Literal["raise", "skip"]] = None,
) -> list[dict]:
    """All canonical rows of a source as a list (`iter_rows` without the locations)."""
    return [
        row
        for _, row in iter_rows(
            source, kind, need_final_assistant=need_final_assistant, skipped=skipped, seed=seed, on_error=on_error
        )
    ]


def source_format(source, kind: Optional[Kind] = None) -> str:
    """The format of a source's (first) entry, as reading it would settle it."""
    return open_source(as_specs(source)[0], kind, need_final_assistant=False).format


def convert_to_jsonl(
    source, out: str | Path, kind: Optional[Kind] = None, skipped: Optional[SkipReport] = None, seed: int = 0
) -> int:
    """Write a source's canonical rows to JSONL atomically (temp file + rename), streaming; return the count.

    Values JSON has no type for (timestamps, say) are written as their string form.
    """
    rows = (row for _, row in iter_rows(source, kind, need_final_assistant=False, skipped=skipped, seed=seed))
    return write_jsonl(out, rows)
