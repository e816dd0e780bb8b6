"""Data: conversational JSONL (conversations.py), the layouts people store chat data in (formats.py), data-source
settings (spec.py), file readers (readers.py), the reader stages call (sources.py), and prompt sets (prompts.py:
the comparison form of a prompt, deduplication, a seeded train/held-out split).

Stages read their data with `read_rows(source, kind)` / `iter_rows(...)`; a config field that takes data is
typed `DataSource` (a path, a mapping of settings, or a weighted list of them).
"""

from .conversations import (
    DataError,
    check_conversation,
    iter_conversations,
    iter_jsonl,
    prompt_of,
    read_conversations,
    write_jsonl,
)
from .formats import FORMATS, FormatError, RowError, detect_format, to_canonical
from .readers import Loc
from .sources import SkipReport, convert_to_jsonl, iter_rows, read_rows, source_format
from .spec import DataSource, SourceSpec, as_specs, is_spec, source_files, source_fingerprint, source_json

__all__ = [
    "DataError",
    "check_conversation",
    "iter_conversations",
    "iter_jsonl",
    "prompt_of",
    "read_conversations",
    "write_jsonl",
    "FORMATS",
    "FormatError",
    "RowError",
    "detect_format",
    "to_canonical",
    "Loc",
    "SkipReport",
    "convert_to_jsonl",
    "iter_rows",
    "read_rows",
    "source_format",
    "DataSource",
    "SourceSpec",
    "as_specs",
    "is_spec",
    "source_files",
    "source_fingerprint",
    "source_json",
]
