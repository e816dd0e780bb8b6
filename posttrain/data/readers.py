"""Opening the files of one source as a stream of raw rows, in file order or by index.

- JSON (`.jsonl`, and `.json` holding JSON lines or one top-level array) is parsed here, line by line or
  object by object. `datasets`' JSON loader infers one Arrow schema for the file and, where a column's
  type varies, stores it as JSON text and decodes it back: an `"answer": "3"` string came back as the
  integer 3 (datasets 5.2), which would make a verifier compare the wrong thing. Parsing here keeps every
  value as written, gives line numbers for errors, and writes no cache copy.
- Parquet, CSV and Arrow files go through `datasets` streaming (`load_dataset(..., streaming=True)`, read
  in batches, nothing copied), or for a shuffled read through its memory-mapped Arrow cache. CSV cells are
  read as strings, as written: a CSV has no types, and "007" must stay "007".
- `save_to_disk` directories (Dataset or DatasetDict) through `load_from_disk`, memory-mapped.
- Other directories and cached hub data sets: their data files, split by file name as `datasets` does.

A raw row is a dict, or a BadRow when the file could not give one (invalid JSON or UTF-8): the caller
decides whether that stops the read or is skipped.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import shutil
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .conversations import DataError
from .spec import SUFFIXES, data_suffix, glob_files, hub_snapshot

BATCH = 1024
"""Rows per batch read from Arrow-backed files (and per chunk of a shuffled read)."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Loc:
    """Where a row is: its file and 1-based row number, and the line for files read line by line."""

    file: str
    row: int
    line: Optional[int] = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else f"{self.file}: row {self.row}"


@dataclass(frozen=True)
class BadRow:
    """A row the file could not give: `message` for errors, `reason` a short label for counting."""

    message: str
    reason: str


Raw = tuple[Loc, Union[dict, BadRow]]


class DataFile:
    """The rows of one file (or one split of a saved data set): streamed in order, or taken by index."""

    name: str

    def rows(self) -> Iterator[Raw]:
        """Every row, in file order, without holding more than a batch."""
        raise NotImplementedError

    def num_rows(self) -> int:
        """How many rows (a first pass over the file for JSON lines)."""
        raise NotImplementedError

    def take(self, indices: Sequence[int]) -> list[Raw]:
        """The rows at these 0-based positions, in the order given."""
        raise NotImplementedError

    def first(self) -> Optional[Raw]:
        """The first row (for format detection), or None for an empty file."""
        return next(iter(self.rows()), None)


def _open_bytes(path: Path):
    """The file's bytes, decompressed when its name ends in .gz."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _utf8_problem(path: Path) -> DataError:
    """Name the first line of `path` that is not valid UTF-8 (for readers that only say the file has one)."""
    with _open_bytes(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return DataError(
                    f"{path}:{lineno}: invalid UTF-8 (byte {err.start + 1} of the line: "
                    f"{line[err.start : err.start + 1]!r}); save the file as UTF-8"
                )
    return DataError(f"{path}: invalid UTF-8; save the file as UTF-8")


def parse_line(raw: bytes) -> Union[dict, BadRow]:
    """One line of a JSON-lines file -> its object, or a BadRow saying why not (UTF-8, JSON, not an object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRow(
            f"invalid UTF-8 (byte {err.start + 1} of the line: {raw[err.start : err.start + 1]!r})", "invalid UTF-8"
        )
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return BadRow(f"invalid JSON: {err.msg} (column {err.colno})", "invalid JSON")
    if not isinstance(obj, dict):
        return BadRow(f"expected a JSON object, got {type(obj).__name__}", "not a JSON object")
    return obj


_ONE_OBJECT = (
    "the file looks like one JSON object over several lines; rows must be JSON lines (one object per line) or a "
    'top-level array of objects (rows stored under a key, {"data": [...]}, must be taken out of it)'
)


def _opens_an_object(first_line: bytes) -> bool:
    """A first line that opens an object it does not close ('{' or '{"data": ['), as a pretty-printed file has."""
    text = first_line.strip()
    return text.startswith(b"{") and not text.endswith(b"}")


class JsonFile(DataFile):
    """JSON lines (one object per line), or one top-level array of objects, streamed."""

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        with _open_bytes(path) as f:
            head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
        self.array = head.startswith(b"[")
        self._index: Optional[tuple[array, array]] = None
        self._all: Optional[list[Raw]] = None
        self._plain = None  # a .gz file's decompressed copy, for reads by index

    def _seekable(self):
        """The file's bytes, opened where a seek is cheap: the file itself, or a compressed file's decompressed
        copy in an anonymous temp file (under $TMPDIR; gone when the read ends). A seek back in a gzip stream
        decompresses from the start, which made a shuffled read of a .jsonl.gz quadratic (20k rows: 48 s)."""
        if not self.path.name.lower().endswith(".gz"):
            return open(self.path, "rb")
        if self._plain is None:
            self._plain = tempfile.TemporaryFile()
            with gzip.open(self.path, "rb") as src:
                shutil.copyfileobj(src, self._plain, 1 << 20)
        self._plain.seek(0)
        return contextlib.nullcontext(self._plain)

    def rows(self) -> Iterator[Raw]:
        if self.array:
            yield from self._array_rows()
            return
        with _open_bytes(self.path) as f:
            row = 0
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if raw.strip():
                    row += 1
                    got = parse_line(raw)
                    if row == 1 and isinstance(got, BadRow) and _opens_an_object(raw):
                        got = BadRow(f"{got.message}: {_ONE_OBJECT}", got.reason)
                    yield Loc(self.name, row, lineno), got

    def _array_rows(self) -> Iterator[Raw]:
        """Objects of a top-level array, decoded one at a time from a sliding buffer (memory: one chunk plus
        the largest object). An error inside the array ends the read: the rest cannot be trusted."""
        decoder = json.JSONDecoder()
        try:
            f = io.TextIOWrapper(_open_bytes(self.path), encoding="utf-8-sig")
            with f:
                buf, pos, line, row, done = f.read(_CHUNK), 0, 1, 0, False

                def skip_space() -> bool:  # advance past whitespace, refilling; False at end of file
                    nonlocal buf, pos, line, done
                    while True:
                        while pos < len(buf) and buf[pos] in " \t\r\n":
                            line += buf[pos] == "\n"
                            pos += 1
                        if pos < len(buf) or done:
                            return pos < len(buf)
                        more = f.read(_CHUNK)
                        buf, pos, done = buf[pos:] + more, 0, not more

                skip_space()
                pos += 1  # the opening '['
                while skip_space():
                    if buf[pos] == "]":
                        return
                    if row:
                        if buf[pos] != ",":
                            raise DataError(
                                f"{self.name}:{line}: expected ',' or ']' after row {row} of the "
                                f"top-level array, got {buf[pos : pos + 20]!r}"
                            )
                        pos += 1
                        skip_space()
                    if pos >= len(buf) or buf[pos] != "{":
                        raise DataError(
                            f"{self.name}:{line}: expected an object in the top-level array "
                            f"(row {row + 1}), got {buf[pos : pos + 20]!r}"
                        )
                    while True:
                        try:
                            obj, end = decoder.raw_decode(buf, pos)
                            break
                        except json.JSONDecodeError as err:
                            if done:
                                raise DataError(
                                    f"{self.name}:{line + buf.count(chr(10), pos, err.pos)}: invalid "
                                    f"JSON in row {row + 1}: {err.msg}"
                                ) from None
                            more = f.read(_CHUNK)  # the object runs past the buffer: read on and retry
                            buf, pos, done = buf[pos:] + more, 0, not more
                    row += 1
                    yield Loc(self.name, row, line), obj
                    line += buf.count("\n", pos, end)
                    pos = end
                raise DataError(f"{self.name}:{line}: the top-level array is not closed with ']'")
        except UnicodeDecodeError:
            raise _utf8_problem(self.path) from None

    def _line_index(self) -> tuple[array, array]:
        """Byte offset and line number of every non-empty line (16 bytes a row), for reads by index."""
        if self._index is None:
            offsets, lines = array("q"), array("q")
            with self._seekable() as f:
                pos = 0
                for lineno, raw in enumerate(f, 1):
                    if raw.strip():
                        offsets.append(pos)
                        lines.append(lineno)
                    pos += len(raw)
            self._index = (offsets, lines)
        return self._index

    def num_rows(self) -> int:
        if self.array:
            return len(self._materialised())
        return len(self._line_index()[0])

    def _materialised(self) -> list[Raw]:
        # A shuffled read of a top-level array holds it all: JSON lines are read by offset instead.
        if self._all is None:
            self._all = list(self._array_rows())
        return self._all

    def take(self, indices: Sequence[int]) -> list[Raw]:
        if self.array:
            rows = self._materialised()
            return [rows[i] for i in indices]
        offsets, lines = self._line_index()
        out = []
        with self._seekable() as f:
            for i in indices:
                f.seek(offsets[i])
                raw = f.readline()
                out.append((Loc(self.name, i + 1, lines[i]), parse_line(raw.removeprefix(codecs.BOM_UTF8))))
        return out


def _batch_rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*batch.values())]


class ArrowBackedFile(DataFile):
    """A Parquet, CSV or Arrow file read through `datasets`: streamed, or memory-mapped for reads by index."""

    def __init__(self, path: Path, builder: str):
        self.path, self.name, self.builder = path, str(path), builder
        self._options: dict = {}
        if builder == "csv":
            # Only an empty cell is null: text such as "NA" or "None" is kept as written (pandas would null it).
            self._options = {"features": self._csv_features(), "keep_default_na": False, "na_values": [""]}
        elif builder == "parquet":
            self._options = {"batch_size": BATCH}  # datasets' default reads a whole row group (~1M rows) at once
        self._mapped = None

    def _csv_features(self):
        from datasets import Features, Value  # datasets costs ~1.5 s to import: only readers of these files pay it

        try:
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                header = next(csv.reader(f), None)
        except UnicodeDecodeError:
            raise _utf8_problem(self.path) from None
        if not header:
            raise DataError(f"{self.name}: an empty CSV file (no header row)")
        return Features({name: Value("string") for name in header})

    def _call(self, fn):
        """Run a datasets call, turning its failures into DataErrors that name the file."""
        try:
            return fn()
        except DataError:
            raise
        except UnicodeDecodeError:
            raise _utf8_problem(self.path) from None
        except Exception as err:  # noqa: BLE001 - pyarrow and pandas raise many kinds; all mean "unreadable"
            raise DataError(f"{self.name}: cannot read it as {self.builder}: {type(err).__name__}: {err}") from None

    def rows(self) -> Iterator[Raw]:
        from datasets import load_dataset

        stream = self._call(
            lambda: load_dataset(
                self.builder, data_files={"train": [str(self.path)]}, split="train", streaming=True, **self._options
            )
        )
        batches = self._call(lambda: iter(stream.iter(batch_size=BATCH)))
        row = 0
        while True:
            batch = self._call(lambda: next(batches, None))
            if batch is None:
                return
            for obj in _batch_rows(batch):
                row += 1
                yield Loc(self.name, row), obj

    def _dataset(self):
        # Reads by index need random access: datasets' Arrow cache of the file, memory-mapped.
        if self._mapped is None:
            from datasets import load_dataset

            self._mapped = self._call(
                lambda: load_dataset(
                    self.builder, data_files={"train": [str(self.path)]}, split="train", **self._options
                )
            )
        return self._mapped

    def num_rows(self) -> int:
        return len(self._dataset())

    def take(self, indices: Sequence[int]) -> list[Raw]:
        batch = self._call(lambda: self._dataset()[list(indices)])
        return [(Loc(self.name, i + 1), obj) for i, obj in zip(indices, _batch_rows(batch))]


class SavedDataset(DataFile):
    """One split of a `save_to_disk` directory, memory-mapped by `datasets`."""

    def __init__(self, path: Path, split: Optional[str]):
        from datasets import Dataset, load_from_disk

        try:
            loaded = load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - a damaged directory raises from deep inside datasets
            raise DataError(
                f"{path}: cannot read it as a save_to_disk directory: {type(err).__name__}: {err}"
            ) from None
        if isinstance(loaded, Dataset):
            if split is not None:
                raise DataError(
                    f"{path}: split {split!r} is set, but this save_to_disk directory holds one Dataset (no splits)"
                )
            self.ds, self.name = loaded, str(path)
        else:
            name = pick_split(str(path), list(loaded), split)
            self.ds, self.name = loaded[name], f"{path}[{name}]"
        self.ds = self.ds.with_format(None)  # plain Python values, whatever format it was saved with

    def rows(self) -> Iterator[Raw]:
        row = 0
        for batch in self.ds.iter(batch_size=BATCH):
            for obj in _batch_rows(batch):
                row += 1
                yield Loc(self.name, row), obj

    def num_rows(self) -> int:
        return len(self.ds)

    def take(self, indices: Sequence[int]) -> list[Raw]:
        return [(Loc(self.name, i + 1), obj) for i, obj in zip(indices, _batch_rows(self.ds[list(indices)]))]


def pick_split(where: str, splits: list[str], split: Optional[str]) -> str:
    """The split to read: the one asked for, or the only one; else a DataError listing them."""
    if split is not None:
        if split not in splits:
            raise DataError(f"{where}: no split {split!r}; available splits: {', '.join(splits)}")
        return split
    if len(splits) == 1:
        return splits[0]
    raise DataError(f"{where}: several splits ({', '.join(splits)}); set split to one of them")


def open_file(path: Path) -> DataFile:
    """A data file by its suffix."""
    suffix = data_suffix(path)
    if suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
        return JsonFile(path)
    if suffix in (".parquet", ".csv", ".arrow"):
        return ArrowBackedFile(path, suffix[1:])
    raise DataError(
        f"{path}: unsupported file type {suffix or '(none)'!r}; a data file must be one of {', '.join(SUFFIXES)}"
    )


def _directory_files(path: Path, split: Optional[str]) -> list[DataFile]:
    """The data files of one split of a plain directory (or a hub snapshot), split by their names as
    `load_dataset(directory)` would (train-*.parquet, data/test.jsonl, ...)."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except EmptyDatasetError:
        raise DataError(f"{path}: a directory with no data files (and not a save_to_disk directory)") from None
    chosen = pick_split(str(path), [str(s) for s in files], split)
    found = [Path(f) for f in files[chosen]]
    usable = [f for f in found if data_suffix(f) in SUFFIXES]
    if not usable:
        raise DataError(
            f"{path}: split {chosen!r} has no data file of a supported type ({', '.join(SUFFIXES)}); "
            f"found {', '.join(f.name for f in found[:5])}"
        )
    return [open_file(f) for f in sorted(usable)]


def open_source_files(path: str, split: Optional[str] = None) -> list[DataFile]:
    """The data files a source path names, for one split: a file, a save_to_disk directory, a directory of
    data files, or a data set in the local hub cache (never downloaded)."""
    p, matched = Path(path), glob_files(path)
    if matched:
        if split is not None:
            raise DataError(f"{path}: split {split!r} is set but a pattern names files, not splits")
        return [open_file(f) for f in matched]
    if p.is_file():
        if split is not None:
            raise DataError(f"{path}: split {split!r} is set but this is a single file (it has one split)")
        return [open_file(p)]
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return [SavedDataset(p, split)]
        return _directory_files(p, split)
    snapshot = hub_snapshot(path)
    if snapshot is None:
        raise DataError(
            f"{path}: no such file or directory, and no data set of that name in the local Hugging Face "
            f"cache; nothing is downloaded (fetch it where there is network, or save it locally)"
        )
    return _directory_files(snapshot, split)
