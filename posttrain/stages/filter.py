"""filter: clean SFT data as the Gemma reports do: personal information, unsafe text, wrong
self-identification, broken structure, duplicates, and train rows whose prompt is in the eval split.

Streams: rows are read line by line, judged in batches of `batch_size`, and written line by line to a
temp file renamed into place at the end, so memory does not grow with the input except for the dedup
indexes, which hold hashes (see posttrain/filters.py). A row that passes unchanged is written back
byte for byte; a redacted row is re-serialised.

Filters run in this order, and a dropped row is counted by the first filter that drops it:
structure, pii, unsafe_terms, identity, classifier, eval_overlap, exact_dup, near_dup.

Eval data is passed through untouched: this stage does not produce eval_data, so later stages keep
reading the synth split. It is read only to drop train rows whose normalised prompt is an eval prompt,
which keeps the two disjoint even when the train file came from elsewhere.

Output in run_dir/filter/: train.jsonl, report.json and report.md (per filter: rows seen, dropped,
changed, reasons, examples).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..config import InputPath, Section
from ..data import DataError, DataSource, SkipReport, iter_rows, source_format
from ..dedup import HashIndex, NearDupIndex
from ..filters import (DEFAULT_OTHER_NAMES, DEFAULT_TERMS_FILE, PLACEHOLDERS, IdentityChecker, PIIDetector,
                       TermMatcher, hash64, load_hook, normalise, read_terms, score_texts, shape_error,
                       structure_problem)
from ..manifest import atomic_write_json, atomic_write_text
from .base import Stage

Role = Literal["user", "assistant"]
FILTERS = ["structure", "pii", "unsafe_terms", "identity", "classifier", "eval_overlap", "exact_dup", "near_dup"]
"""Filter names in the order they run (and in the report)."""


class StructureConfig(Section):
    """Rows that are not a complete, well-formed conversation."""

    enabled: bool = True
    """Drop rows with non-alternating roles, empty turns, a missing final answer, truncation, over-length."""
    require_final_assistant: bool = True
    """The last turn must be the assistant's."""
    drop_unfinished: bool = True
    """Drop rows whose metadata says the answer was cut off (`finished: false` or `truncated: true`)."""
    final_endings: Optional[list[str]] = None
    """If set, the final assistant turn must end with one of these strings (e.g. ['.', '!', '?'])."""
    drop_control_tokens: bool = True
    """Drop rows whose text contains chat control tokens (<start_of_turn>, <end_of_turn>, <eos>, ...)."""
    max_chars: Optional[int] = Field(None, ge=1)
    """Drop rows longer than this many characters (all turns); None: no limit."""
    max_tokens: Optional[int] = Field(None, ge=1)
    """Drop rows whose chat-rendered text is longer than this many tokens (needs `tokenizer`)."""
    tokenizer: InputPath = None
    """Tokenizer directory used for max_tokens."""

    @model_validator(mode="after")
    def _tokenizer_for_tokens(self):
        if self.max_tokens is not None and self.tokenizer is None:
            raise ValueError("max_tokens needs tokenizer: a directory with a saved tokenizer")
        return self


class PIIConfig(Section):
    """Personal information: emails, phones, card numbers (Luhn-checked), IP addresses, national IDs."""

    enabled: bool = True
    """Look for personal information."""
    action: Literal["drop", "redact"] = "drop"
    """Drop the row, or replace each finding with a typed placeholder ([EMAIL], [PHONE], ...)."""
    types: list[Literal["email", "phone", "credit_card", "ip_address", "id"]] = list(PLACEHOLDERS)
    """Which kinds to look for ('id': US SSN ddd-dd-dddd plus extra_id_patterns)."""
    extra_id_patterns: list[str] = []
    """More national-ID regexes (Python syntax), each finding counted and redacted as [ID]."""
    roles: list[Role] = ["user", "assistant"]
    """Turns to check."""

    @field_validator("extra_id_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        import re

        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"not a valid regex {p!r}: {err}") from None
        return patterns


class UnsafeConfig(Section):
    """Unsafe or toxic text: a term list, and an optional classifier hook."""

    enabled: bool = True
    """Drop rows containing a listed term (whole words, any case)."""
    terms_file: InputPath = None
    """Term list, one per line ('#' comments); None: the shipped data/filters/unsafe_terms.txt."""
    extra_terms: list[str] = []
    """Terms added to the file's."""
    roles: list[Role] = ["assistant"]
    """Turns to check. Default assistant only: harmful *requests* answered by a refusal are wanted data."""
    classifier: Optional[str] = None
    """Optional scorer 'path/to/file.py:function': called with a list of texts, returns one score each."""
    threshold: float = 0.5
    """Rows whose classifier score is above this are dropped."""

    @field_validator("classifier")
    @classmethod
    def _hook_spec(cls, spec: Optional[str]) -> Optional[str]:
        if spec is None:
            return spec
        path, sep, func = spec.rpartition(":")
        if not sep or not path or not func:
            raise ValueError(f"expected 'path/to/file.py:function', got {spec!r}")
        if not Path(path).is_file():
            raise ValueError(f"hook file not found: {path} (relative paths are read from {os.getcwd()})")
        return spec


class IdentityConfig(Section):
    """Assistant turns claiming another model's or maker's identity, or contradicting the release's."""

    enabled: bool = True
    """Check assistant turns for wrong self-identification."""
    release_name: Optional[str] = None
    """The release's own name: 'I am X' with X not starting with it is dropped. None: not checked."""
    release_maker: Optional[str] = None
    """The release's maker: 'I was trained by X' (X capitalised) with another X is dropped."""
    other_names: list[str] = list(DEFAULT_OTHER_NAMES)
    """Other assistants and companies a response must not claim to be or be made by."""
    allowed_names: list[str] = ["OK", "Okay"]
    """Capitalised words after 'I am' that are not names."""


class DedupConfig(Section):
    """Exact and near duplicates (MinHash LSH), and train rows that repeat an eval prompt."""

    exact: bool = True
    """Drop rows whose normalised text (case, whitespace, punctuation ignored) was seen before."""
    near: bool = True
    """Drop rows whose estimated Jaccard similarity to an earlier kept row is >= threshold."""
    eval_overlap: bool = True
    """Drop train rows whose normalised prompt is an eval prompt (needs eval data)."""
    threshold: float = Field(0.8, gt=0, lt=1)
    """Jaccard similarity from which two rows are near duplicates."""
    num_perm: int = Field(128, ge=16, le=1024)
    """MinHash permutations (more: a sharper threshold, more time and memory)."""
    shingle_size: int = Field(5, ge=1)
    """Shingle length, in characters or words (shingle_unit)."""
    shingle_unit: Literal["chars", "words"] = "chars"
    """Shingles of characters (robust on short rows) or of words."""


class FilterConfig(Section):
    """Config of the filter stage."""

    train_data: DataSource = None
    """Conversations to filter (path, mapping or mixture); default: the latest data stage's train split."""
    eval_data: DataSource = None
    """Held-out conversations whose prompts train rows must not repeat; default: the data stage's eval split."""
    on_error: Literal["raise", "skip"] = "raise"
    """Malformed rows (bad JSON, no messages list): stop naming file:line, or skip and count them."""
    batch_size: int = Field(1024, ge=1)
    """Rows judged together (classifier calls and MinHash are batched)."""
    max_examples: int = Field(5, ge=0)
    """Examples per filter kept in the report."""
    example_chars: int = Field(200, ge=10)
    """Example texts in the report are cut to this many characters."""
    structure: StructureConfig = StructureConfig()
    """Structure checks."""
    pii: PIIConfig = PIIConfig()
    """Personal information."""
    unsafe: UnsafeConfig = UnsafeConfig()
    """Unsafe content."""
    identity: IdentityConfig = IdentityConfig()
    """Self-identification."""
    dedup: DedupConfig = DedupConfig()
    """Duplicates."""


class Tally:
    """What one filter saw, dropped and changed, with a few examples."""

    def __init__(self, max_examples: int, example_chars: int):
        self.seen = self.dropped = self.changed = 0
        self.reasons: Counter = Counter()
        self.examples: list[dict] = []
        self._max, self._chars = max_examples, example_chars

    def note(self, line: int, reasons: str | list[str], text: str, dropped: bool = True) -> None:
        """Count one dropped (or changed) row under each of its reasons; keep it as an example if room."""
        reasons = [reasons] if isinstance(reasons, str) else reasons
        self.dropped += dropped
        self.changed += not dropped
        self.reasons.update(reasons)
        if len(self.examples) < self._max:
            cut = text if len(text) <= self._chars else text[:self._chars] + "..."
            self.examples.append({"line": line, "reason": "+".join(reasons), "text": cut})

    def as_dict(self) -> dict:
        return {"seen": self.seen, "dropped": self.dropped, "changed": self.changed,
                "reasons": dict(self.reasons.most_common()), "examples": self.examples}


def _texts(row: dict, roles) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] in roles]


def _row_text(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"])


def _messages_jsonl(source) -> bool:
    """A JSONL path of messages rows: read line by line here, so kept rows are copied byte for byte."""
    if not (isinstance(source, (str, os.PathLike)) and str(source).endswith(".jsonl")):
        return False
    try:
        return source_format(str(source), "conversation") == "messages"
    except DataError:
        return True  # a malformed first line: the line reader reports it (or counts it, on_error: skip)


class _TallySkips(SkipReport):
    """Rows the data reader skips, counted as malformed in the filter report."""

    def __init__(self, tally: Tally):
        super().__init__(max_examples=0)
        self.tally = tally

    def add(self, where, reason: str, error: str) -> None:
        super().add(where, reason, error)
        self.tally.note(where.row, reason, error)


class FilterStream:
    """The streaming core: `run(src, dst)` filters one JSONL file into another and returns the report.

    One instance filters one file: the tallies and dedup indexes accumulate.
    `key` prefixes config keys in error messages (the stage's name in the pipeline config).
    """

    def __init__(self, cfg: FilterConfig, eval_path: Optional[str] = None, key: str = "filter"):
        self.cfg, self.key = cfg, key
        self.tally = {name: Tally(cfg.max_examples, cfg.example_chars) for name in FILTERS}
        self.malformed = Tally(cfg.max_examples, cfg.example_chars)
        self.enabled = self._enabled(eval_path)
        s, u, i, d = cfg.structure, cfg.unsafe, cfg.identity, cfg.dedup
        self.pii = PIIDetector(cfg.pii.types, cfg.pii.extra_id_patterns)
        terms = read_terms(u.terms_file or DEFAULT_TERMS_FILE) if u.enabled else []
        self.terms = TermMatcher(terms + u.extra_terms)
        self.identity = IdentityChecker(i.release_name, i.release_maker, i.other_names, i.allowed_names)
        self.hook = load_hook(u.classifier, f"{key}.unsafe.classifier") if u.classifier else None
        self.count_tokens = self._token_counter(s.tokenizer) if s.enabled and s.max_tokens else None
        self.exact = HashIndex()
        self.near = NearDupIndex(d.threshold, d.num_perm, d.shingle_size, d.shingle_unit) if d.near else None
        self.eval_prompts = self._eval_prompts(eval_path) if "eval_overlap" in self.enabled else None

    def _enabled(self, eval_path: Optional[str]) -> set[str]:
        c = self.cfg
        on = {"structure": c.structure.enabled, "pii": c.pii.enabled, "unsafe_terms": c.unsafe.enabled,
              "identity": c.identity.enabled, "classifier": c.unsafe.classifier is not None,
              "eval_overlap": c.dedup.eval_overlap and eval_path is not None,
              "exact_dup": c.dedup.exact, "near_dup": c.dedup.near}
        return {name for name, flag in on.items() if flag}

    @staticmethod
    def _token_counter(tokenizer_dir: str) -> Callable[[list[dict]], int]:
        from ..chat import render
        from ..models import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        return lambda msgs: len(tok(render(msgs), add_special_tokens=False)["input_ids"])

    def _eval_prompts(self, path: str) -> HashIndex:
        index = HashIndex()
        keys = [hash64(self._prompt_key(row)) for _, _, row in self._parse(path, count=False)]
        index.first_seen(keys, range(len(keys)))
        return index

    @staticmethod
    def _prompt_key(row: dict) -> str:
        msgs = row["messages"]
        prompt = msgs[:-1] if len(msgs) > 1 and msgs[-1]["role"] == "assistant" else msgs
        return "\n".join(normalise(m["content"]) for m in prompt)

    # ------------------------------------------------------------------------------------ reading

    def _parse(self, path, count: bool = True):
        """Yield (line number, raw line, row) for each well-shaped row; malformed ones raise or are counted.
        Sources other than a JSONL of messages (formats, mappings, mixtures) are read through posttrain.data."""
        if not _messages_jsonl(path):
            yield from self._parse_source(path, count)
            return
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    problem = shape_error(row)
                except json.JSONDecodeError as err:
                    problem = f"invalid JSON: {err.msg} (column {err.colno})"
                if problem is None:
                    yield lineno, line, row
                elif self.cfg.on_error == "raise":
                    raise DataError(f"{path}:{lineno}: {problem}")
                elif count:  # reason without the column, so the count of reasons stays small
                    self.malformed.note(lineno, problem.split(" (column")[0], f"[{problem}] {line.strip()}")

    def _parse_source(self, source, count: bool):
        tally = self.malformed if count else Tally(0, 0)
        skipped = _TallySkips(tally)
        for n, (_, row) in enumerate(iter_rows(source, "conversation", need_final_assistant=False, skipped=skipped,
                                               on_error=self.cfg.on_error), 1):
            yield n, json.dumps(row, ensure_ascii=False), row

    # ---------------------------------------------------------------------------------- judging

    def _judge_row(self, lineno: int, row: dict) -> tuple[bool, bool]:
        """Per-row filters in order: (kept, changed). Redaction edits `row` in place."""
        on, t, cfg = self.enabled, self.tally, self.cfg
        if "structure" in on:
            t["structure"].seen += 1
            s = cfg.structure
            why = structure_problem(row, s.require_final_assistant, s.drop_unfinished, s.final_endings, s.max_chars,
                                    s.drop_control_tokens)
            if why is None and self.count_tokens and self.count_tokens(row["messages"]) > s.max_tokens:
                why = "too_long"
            if why:
                t["structure"].note(lineno, why, _row_text(row))
                return False, False
        changed = False
        if "pii" in on:
            t["pii"].seen += 1
            found: Counter = Counter()
            redacted = []
            for m in row["messages"]:
                new, hits = self.pii.redact(m["content"]) if m["role"] in cfg.pii.roles else (m["content"], None)
                redacted.append(new)
                found.update(hits or {})
            if found:
                drop = cfg.pii.action == "drop"
                if not drop:
                    for m, new in zip(row["messages"], redacted):
                        m["content"] = new
                    changed = True
                # the example shows the redacted text in both modes: the report must not copy personal data
                t["pii"].note(lineno, sorted(found), "\n".join(redacted), dropped=drop)
                if drop:
                    return False, False
        if "unsafe_terms" in on:
            t["unsafe_terms"].seen += 1
            term = next(filter(None, map(self.terms.find, _texts(row, cfg.unsafe.roles))), None)
            if term:
                t["unsafe_terms"].note(lineno, term, _row_text(row))
                return False, changed
        if "identity" in on:
            t["identity"].seen += 1
            claim = next(filter(None, map(self.identity.check, _texts(row, ["assistant"]))), None)
            if claim:
                t["identity"].note(lineno, claim[0], f"[{claim[1]}] {_row_text(row)}")
                return False, changed
        return True, changed

    def _judge_batch(self, batch: list[list]) -> None:
        """Batch filters, in order, over rows still kept; each item is [lineno, line, row, kept, changed]."""
        alive = [b for b in batch if b[3]]
        self._normalised: dict[int, str] = {}   # line -> normalised text, shared by both dedup filters
        for name, judge in (("classifier", self._classify), ("eval_overlap", self._eval_overlap),
                            ("exact_dup", self._dedup), ("near_dup", self._dedup)):
            if name in self.enabled and alive:
                self.tally[name].seen += len(alive)
                judge(name, alive)
                alive = [b for b in alive if b[3]]

    def _drop(self, name: str, item: list, reason: str, text: str) -> None:
        item[3] = False
        self.tally[name].note(item[0], reason, text)

    def _classify(self, name: str, alive: list[list]) -> None:
        texts = ["\n".join(_texts(b[2], self.cfg.unsafe.roles)) for b in alive]
        threshold = self.cfg.unsafe.threshold
        for b, text, score in zip(alive, texts, score_texts(self.hook, texts, f"{self.key}.unsafe.classifier")):
            if score > threshold:
                self._drop(name, b, f"score > {threshold}", f"[{score:.3g}] {text}")

    def _eval_overlap(self, name: str, alive: list[list]) -> None:
        prompts = [self._prompt_key(b[2]) for b in alive]
        hits = self.eval_prompts.lookup(np.array([hash64(p) for p in prompts], dtype=np.uint64))
        for b, prompt, hit in zip(alive, prompts, hits.tolist()):
            if hit >= 0:
                self._drop(name, b, "prompt in eval", prompt)

    def _dedup(self, name: str, alive: list[list]) -> None:
        for b in alive:
            if b[0] not in self._normalised:
                self._normalised[b[0]] = "\n".join(normalise(m["content"]) for m in b[2]["messages"])
        texts, lines = [self._normalised[b[0]] for b in alive], [b[0] for b in alive]
        if name == "exact_dup":
            earlier = self.exact.first_seen([hash64(t) for t in texts], lines)
        else:
            earlier = self.near.add_batch([t.replace("\n", " ") for t in texts], lines)
        for b, first in zip(alive, earlier):
            if first is not None:
                self._drop(name, b, "duplicate", f"[duplicate of line {first}] {_row_text(b[2])}")

    # ---------------------------------------------------------------------------------- running

    def run(self, src: str | Path, dst: str | Path, on_batch: Optional[Callable[[int], None]] = None) -> dict:
        """Filter `src` into `dst` (temp file + rename); return the report. `on_batch(rows_read)` after each batch."""
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
        rows_in = kept = changed = 0
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                batch: list[list] = []
                for lineno, line, row in self._parse(src):
                    rows_in += 1
                    batch.append([lineno, line, row, *self._judge_row(lineno, row)])
                    if len(batch) >= self.cfg.batch_size:
                        kept_now, changed_now = self._flush(batch, out)
                        kept, changed, batch = kept + kept_now, changed + changed_now, []
                        if on_batch:
                            on_batch(rows_in)
                kept_now, changed_now = self._flush(batch, out)
                kept, changed = kept + kept_now, changed + changed_now
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self._report(src, rows_in, kept, changed)

    def _flush(self, batch: list[list], out) -> tuple[int, int]:
        self._judge_batch(batch)
        kept = changed = 0
        for _, line, row, keep, was_changed in batch:
            if keep:
                out.write(json.dumps(row, ensure_ascii=False) + "\n" if was_changed else line.rstrip("\r\n") + "\n")
                kept, changed = kept + 1, changed + was_changed
        return kept, changed

    def _report(self, src, rows: int, kept: int, changed: int) -> dict:
        malformed = self.malformed.dropped
        return {"input": str(src), "lines": rows + malformed, "malformed": malformed, "rows": rows, "kept": kept,
                "dropped": rows - kept, "changed": changed, "malformed_examples": self.malformed.examples,
                "filters": {name: {"enabled": name in self.enabled, **tally.as_dict()}
                            for name, tally in self.tally.items()}}


def report_markdown(report: dict) -> str:
    """A human-readable report.md: totals, a table per filter, then examples."""
    out = [f"# Filter report: {report['input']}", "",
           f"{report['lines']} lines: {report['malformed']} malformed (skipped), {report['rows']} rows, "
           f"**{report['kept']} kept** ({report['changed']} changed), {report['dropped']} dropped.", "",
           "| filter | enabled | seen | dropped | changed | reasons |", "|---|---|---|---|---|---|"]
    for name, f in report["filters"].items():
        reasons = ", ".join(f"{r}: {n}" for r, n in list(f["reasons"].items())[:6])
        out.append(f"| {name} | {'yes' if f['enabled'] else 'no'} | {f['seen']} | {f['dropped']} | {f['changed']} "
                   f"| {reasons} |")
    sections = [("malformed", report["malformed_examples"])]
    sections += [(name, f["examples"]) for name, f in report["filters"].items()]
    for name, examples in sections:
        if examples:
            out += ["", f"## {name}", ""]
            out += [f"- line {e['line']} ({e['reason']}): `{_one_line(e['text'])}`" for e in examples]
    return "\n".join(out) + "\n"


def _one_line(text: str) -> str:
    return text.replace("\n", " \u21b5 ").replace("`", "'")


class Filter(Stage):
    name = "filter"
    Config = FilterConfig
    consumes = {"train_data": "train_data", "eval_data": "eval_data"}
    optional_inputs = {"eval_data"}
    produces = {"train_data": "train.jsonl"}

    def setup(self) -> None:
        self.stream = FilterStream(self.cfg, self.ctx.inputs.get("eval_data"), key=self.ctx.name)

    def train(self) -> dict:
        src = self.ctx.inputs["train_data"]
        self.report = self.stream.run(src, self.ctx.dir / "train.jsonl")
        r = self.report
        self.log.info("[%s] %d rows: %d kept (%d changed), %d dropped, %d malformed", self.ctx.name, r["rows"],
                      r["kept"], r["changed"], r["dropped"], r["malformed"])
        return {"rows": r["rows"], "kept": r["kept"], "changed": r["changed"], "malformed": r["malformed"],
                "dropped": {name: f["dropped"] for name, f in r["filters"].items() if f["enabled"]}}

    def save(self) -> dict:
        atomic_write_json(self.ctx.dir / "report.json", self.report)
        atomic_write_text(self.ctx.dir / "report.md", report_markdown(self.report))
        return {}


STAGE = Filter
