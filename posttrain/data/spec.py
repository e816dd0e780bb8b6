"""Data-source settings in a stage config: a path, a mapping of settings, or a weighted list (a mixture).

    train_data: data/train.jsonl                              # a path, as before
    train_data: {path: alpaca.parquet, columns: {text: output}, limit: 5000}
    train_data:                                              # a seeded mixture
      - {path: chat.parquet, weight: 3}
      - {path: mine.jsonl, weight: 1, format: sharegpt}

Validation runs with the config, before any work: unknown keys, wrong types, a path that is neither a
local file or directory nor a data set in the local Hugging Face hub cache. Nothing is ever downloaded.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from huggingface_hub import constants as hub_constants
from pydantic import AfterValidator, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator

from ..config import Section, is_reference, reference_validator
from ..manifest import hash_json, hash_path
from .conversations import DataError
from .formats import FORMAT_NAMES

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv", ".arrow")
"""File types a source may name (a directory may hold them too); JSON may be gzip-compressed (hh-rlhf is)."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
Format = Literal[FORMAT_NAMES]  # type: ignore[valid-type]


def hub_snapshot(name: str) -> Optional[Path]:
    """The snapshot directory of data set `name` in the local Hugging Face hub cache, or None.

    That is where `hf download --repo-type dataset NAME` puts it: datasets--ORG--NAME/snapshots/<rev>,
    the revision `refs/main` names (else the newest snapshot).
    """
    if not _REPO_ID.match(name) or ".." in name:
        return None
    repo = Path(hub_constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    snapshots = sorted((p for p in (repo / "snapshots").glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def data_suffix(path: Path) -> str:
    """The file type by name, lower-cased: '.jsonl', or '.jsonl.gz' for a compressed one ('' for none)."""
    suffixes = [x.lower() for x in path.suffixes]
    return "".join(suffixes[-2:]) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])


def glob_files(value: str) -> Optional[list[Path]]:
    """The files a glob pattern (`data/train-*.parquet`, `shards/**/*.jsonl`) matches, sorted; None when `value`
    is not a pattern (or names an existing path that happens to hold * ? or [)."""
    if not any(c in value for c in "*?[") or Path(value).exists():
        return None
    return sorted(p for p in map(Path, glob.glob(value, recursive=True)) if p.is_file())


@reference_validator
def check_source_path(value: str) -> str:
    """A local file of a known type, a glob pattern matching such files, a directory, a data set name found
    in the local hub cache, or a reference NAME.ARTIFACT to an earlier stage's output (the pipeline checks it
    names one; a name with a data file's suffix is taken as a missing file)."""
    if is_reference(value) and data_suffix(Path(value)) not in SUFFIXES and hub_snapshot(value) is None:
        return value
    matched = glob_files(value)
    if matched is not None:
        if not matched:
            raise ValueError(f"the pattern {value!r} matches no file (relative paths are read from {os.getcwd()})")
        odd = [p for p in matched if data_suffix(p) not in SUFFIXES]
        if odd:
            raise ValueError(
                f"the pattern {value!r} matches {odd[0]}, of unsupported type {data_suffix(odd[0]) or '(none)'!r}; "
                f"a data file must be one of {', '.join(SUFFIXES)} (narrow the pattern)"
            )
        return value
    path = Path(value)
    if path.is_file() and data_suffix(path) not in SUFFIXES:
        raise ValueError(
            f"unsupported file type {data_suffix(path) or '(none)'!r} for {value!r}; a data file must be "
            f"one of {', '.join(SUFFIXES)}"
        )
    if path.exists() or hub_snapshot(value) is not None:
        return value
    raise ValueError(
        f"path does not exist: {value!r} (relative paths are read from {os.getcwd()}), and no data set of that name "
        f"is in the local Hugging Face cache ({hub_constants.HF_HUB_CACHE}). Nothing is downloaded: fetch it on a "
        f"machine with network (`hf download --repo-type dataset NAME`) and copy the cache here, or save it as a "
        f"local file or a save_to_disk directory and set the path to that"
    )


class SourceSpec(Section):
    """One data source and how to read it."""

    path: Annotated[str, AfterValidator(check_source_path)]
    """A .jsonl/.json/.parquet/.csv/.arrow file, a save_to_disk or data-file directory, or a cached hub data set."""
    format: Optional[Format] = None
    """Row layout: messages, sharegpt, alpaca, prompt_completion, prompt, preference, hh; None: detected."""
    split: Optional[str] = None
    """Split of a DatasetDict, directory or cached data set; None: its only split."""
    columns: dict[str, str] = {}
    """Column renames applied first, source name -> name the format uses (e.g. {question: prompt})."""
    limit: Optional[int] = Field(None, ge=1)
    """Take at most this many rows (after shuffling when seed is set); None: all."""
    seed: Optional[int] = None
    """Shuffle the rows with this seed before limit (a seeded random subset); None: keep the file order."""
    system: Literal["fold", "drop", "error"] = "fold"
    """System turns: fold into the next user turn (then a blank line; Gemma has no system role), drop, or reject."""
    on_error: Literal["raise", "skip"] = "raise"
    """A row that does not fit: stop, naming file, row and column; or skip it and count it."""
    weight: Optional[float] = Field(None, gt=0)
    """Share of this source in a mixture (entries of a list only; default 1)."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.split is not None and Path(self.path).is_file():
            raise ValueError(f"split {self.split!r} is set but {self.path!r} is a single file (it has one split)")
        targets = list(self.columns.values())
        if len(set(targets)) < len(targets):
            raise ValueError(f"columns renames two columns to the same name: {self.columns}")
        return self


def _source_tag(value) -> Optional[str]:
    # Tags in angle brackets are union-member labels; config errors leave them out of the key they name.
    if isinstance(value, (str, os.PathLike)):
        return "<path>"
    if isinstance(value, (dict, SourceSpec)):
        return "<mapping>"
    return "<mixture>" if isinstance(value, list) else None


def _check_source(value):
    if isinstance(value, SourceSpec) and value.weight is not None:
        raise ValueError("weight applies to the entries of a list of sources (a mixture), not to a single source")
    if isinstance(value, list) and not value:
        raise ValueError("an empty list of sources")
    return value


DataSource = Annotated[
    Optional[
        Annotated[
            Union[
                Annotated[Annotated[str, AfterValidator(check_source_path)], Tag("<path>")],
                Annotated[SourceSpec, Tag("<mapping>")],
                Annotated[list[SourceSpec], Tag("<mixture>")],
            ],
            Discriminator(
                _source_tag,
                custom_error_type="data_source",
                custom_error_message="expected a path, a mapping {path, format, split, columns, limit, seed, "
                "system, on_error} or a list of such mappings with weights",
            ),
        ]
    ],
    AfterValidator(_check_source),
]
"""A stage's data input: a path string, a SourceSpec mapping, or a list of them with weights (a mixture)."""

_ADAPTER = TypeAdapter(DataSource)


def as_specs(source) -> list[SourceSpec]:
    """Any form of a source (a path, a mapping or list as in a config or a manifest, SourceSpecs) -> specs.

    Raises DataError naming the problem (a missing path, an unknown key) for sources that did not come
    through a validated config.
    """
    if isinstance(source, SourceSpec):
        return [source]
    if isinstance(source, os.PathLike):
        source = str(source)
    try:
        value = _ADAPTER.validate_python(source)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if not str(p).startswith('<')) or 'source'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        name = source.get("path", source) if isinstance(source, dict) else source
        raise DataError(f"data source {name!r}: {problems}") from None
    if value is None:
        raise DataError("no data source given")
    if isinstance(value, str):
        return [SourceSpec(path=value)]
    return [value] if isinstance(value, SourceSpec) else list(value)


def is_spec(value) -> bool:
    """True for a mapping or list source (what a path string alone cannot say)."""
    return isinstance(value, SourceSpec) or (isinstance(value, list) and all(isinstance(v, SourceSpec) for v in value))


def source_json(value) -> str | dict | list:
    """A validated source as plain JSON (for a stage's inputs, its manifest and launch.json); defaults left out."""
    if isinstance(value, SourceSpec):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, list):
        return [source_json(v) for v in value]
    if isinstance(value, dict):  # already plain JSON (a stage's input)
        return value
    return str(value)


def source_fingerprint(value) -> str:
    """A data source's fingerprint: its settings plus the content of the files it reads."""
    return hash_json({"source": source_json(value), "files": {p: hash_path(p) for p in source_files(value)}})


def source_files(value) -> list[str]:
    """The local files and directories a source reads, for fingerprints. A cached hub data set counts by its
    `refs/` directory (the revision), so a new download re-runs the stage without hashing gigabytes."""
    out = []
    for spec in as_specs(value):
        if (matched := glob_files(spec.path)) is not None:
            out.extend(map(str, matched))
        elif Path(spec.path).exists():
            out.append(spec.path)
        elif (snapshot := hub_snapshot(spec.path)) is not None:
            refs = snapshot.parent.parent / "refs"
            out.append(str(refs if refs.is_dir() else snapshot))
    return out
