"""The filter stage's streaming core: one JSONL file in, one out, and a report.

Rows are read line by line, judged in batches of `batch_size`, and written line by line to a temp file
renamed into place at the end, so memory does not grow with the input except for the dedup indexes,
which hold hashes (posttrain/dedup.py), and 4 bytes per classifier score. A row that passes unchanged is
written back byte for byte; a redacted row is re-serialised.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ...data import DataError, RowError, SkipReport, iter_rows, source_format
from ...data.conversations import json_value
from ...data.formats import normalise_messages
from ...data.readers import BadRow, parse_line
from ...dedup import HashIndex, NearDupIndex
from ...manifest import temp_file_beside
from ...filters import (
    DEFAULT_TERMS_FILE,
    IdentityChecker,
    PIIDetector,
    TermMatcher,
    hash64,
    load_hook,
    normalise,
    read_terms,
    score_texts,
    structure_problem,
)
from .config import FILTERS, FilterConfig
from .length import LengthLimit, resolve_length_limit, token_counter
from .report import ScoreStats, Tally


def _texts(row: dict, roles) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] in roles]


def _row_text(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"])


def _prompt_answer(row: dict) -> tuple[str, str]:
    """(every turn but the assistant's, the assistant's turns), each joined by newlines."""
    msgs = row["messages"]
    return (
        "\n".join(m["content"] for m in msgs if m["role"] != "assistant"),
        "\n".join(m["content"] for m in msgs if m["role"] == "assistant"),
    )


def _messages_jsonl(source) -> bool:
    """A JSONL path of messages rows: read line by line here, so kept rows are copied byte for byte."""
    if not (isinstance(source, (str, os.PathLike)) and str(source).endswith(".jsonl")):
        return False
    try:
        return source_format(str(source), "conversation") == "messages"
    except DataError:
        return True  # a malformed first line: the line reader reports it (or counts it, on_error: skip)


def _prompt_turns(row: dict) -> list[dict]:
    """A row's prompt: its messages before the final answer."""
    msgs = row["messages"]
    return msgs[:-1] if len(msgs) > 1 and msgs[-1]["role"] == "assistant" else msgs


def _joined(prompt: list[dict]) -> str:
    return "\n".join(normalise(m["content"]) for m in prompt)


def _line(where) -> int:
    """What the report calls a row's line: its line in a file read line by line, else its row in its file."""
    return where.line if where.line is not None else where.row


class _ReaderSkips(SkipReport):
    """Rows the data reader leaves out, handed to the stream's `_unreadable` as the line reader's are."""

    def __init__(self, unreadable: Callable):
        super().__init__(max_examples=0)
        self.unreadable = unreadable

    def add(self, where, reason: str, error: str) -> None:
        super().add(where, reason, error)
        self.unreadable(_line(where), reason, error, error)


class FilterStream:
    """`run(src, dst)` filters one JSONL file into another and returns the report.

    One instance filters one file: the tallies and dedup indexes accumulate. `key` prefixes config keys
    in error messages (the stage's name in the pipeline config). `length` is the token limit that
    applies (the stage resolves it from the pipeline; default: `resolve_length_limit` with no pipeline).
    Everything that can fail on the config (hook, classifier, tokenizer) is loaded here, before any row.
    """

    def __init__(
        self,
        cfg: FilterConfig,
        eval_path: Optional[str] = None,
        key: str = "filter",
        length: Optional[LengthLimit] = None,
        device: torch.device | str = "cpu",
    ):
        self.cfg, self.key = cfg, key
        self.tally = {name: Tally(cfg.max_examples, cfg.example_chars) for name in FILTERS}
        self.malformed = Tally(cfg.max_examples, cfg.example_chars)
        self.read_and_dropped = 0  # rows the structure filter dropped as they were read (an empty turn)
        self.enabled = self._enabled(eval_path)
        s, u, i, d = cfg.structure, cfg.unsafe, cfg.identity, cfg.dedup
        self.pii = PIIDetector(cfg.pii.types, cfg.pii.extra_id_patterns)
        terms = read_terms(u.terms_file or DEFAULT_TERMS_FILE) if u.enabled else []
        self.terms = TermMatcher(terms + u.extra_terms)
        self.identity = IdentityChecker(i.release_name, i.release_maker, i.other_names, i.allowed_names)
        self.hook = load_hook(u.classifier, f"{key}.unsafe.classifier") if u.classifier else None
        self.model = None
        if u.classifier_model:
            from ...text_classifier import TextClassifier

            self.model = TextClassifier(
                u.classifier_model,
                u.unsafe_labels,
                f"{key}.unsafe",
                u.classifier_batch_size,
                u.classifier_max_length,
                device=torch.device(device),
            )
        self.length = length or resolve_length_limit(s, None, key)
        self.count_tokens = token_counter(self.length) if s.enabled and self.length.max_tokens else None
        self.exact = HashIndex()
        self.near = (
            NearDupIndex(
                d.threshold, d.prompt_threshold, d.min_answer_words, d.num_perm, d.shingle_size, d.shingle_unit
            )
            if d.near
            else None
        )
        self.eval_path = eval_path
        if self.cfg.dedup.eval_overlap and eval_path is None:
            logging.getLogger("posttrain").warning(
                "[%s] dedup.eval_overlap is on but no eval_data was given: training rows are not checked against "
                "held-out prompts (set %s.eval_data, or %s.dedup.eval_overlap: false to say so)",
                key,
                key,
                key,
            )
        self.eval_prompts = self._eval_prompts(eval_path) if "eval_overlap" in self.enabled else None
        self._settings()

    def _enabled(self, eval_path: Optional[str]) -> set[str]:
        c = self.cfg
        on = {
            "structure": c.structure.enabled,
            "pii": c.pii.enabled,
            "unsafe_terms": c.unsafe.enabled,
            "identity": c.identity.enabled,
            "classifier": c.unsafe.classifier is not None or c.unsafe.classifier_model is not None,
            "eval_overlap": c.dedup.eval_overlap and eval_path is not None,
            "exact_dup": c.dedup.exact,
            "near_dup": c.dedup.near,
        }
        return {name for name, flag in on.items() if flag}

    def _settings(self) -> None:
        """The settings each filter runs with, for the report (resolved values, not just the config)."""
        c, t = self.cfg, self.tally
        s = c.structure
        t["structure"].settings = {
            "require_final_assistant": s.require_final_assistant,
            "drop_unfinished": s.drop_unfinished,
            "final_endings": s.final_endings,
            "drop_control_tokens": s.drop_control_tokens,
            "max_chars": s.max_chars,
            **self.length.settings(),
        }
        t["pii"].settings = {
            "action": c.pii.action,
            "types": c.pii.types,
            "roles": c.pii.roles,
            "extra_id_patterns": c.pii.extra_id_patterns,
        }
        u = c.unsafe
        t["unsafe_terms"].settings = {
            "terms_file": str(u.terms_file or DEFAULT_TERMS_FILE),
            "terms": len(self.terms.single) + sum(map(len, self.terms.multi.values())),
            "roles": u.roles,
        }
        i = c.identity
        t["identity"].settings = {
            "release_name": i.release_name,
            "release_maker": i.release_maker,
            "other_names": len(i.other_names),
            "allowed_names": i.allowed_names,
        }
        if self.model is not None:
            t["classifier"].settings = {**self.model.settings(), "threshold": u.threshold}
        elif self.hook is not None:
            t["classifier"].settings = {
                "hook": u.classifier,
                "input": f"the {'+'.join(u.roles)} turns",
                "threshold": u.threshold,
            }
        if "classifier" in self.enabled:
            t["classifier"].scores = ScoreStats(u.threshold)
        t["eval_overlap"].settings = {
            "eval_data": self.eval_path,
            "compares": "normalised prompt; each user turn, also without its leading paragraphs, against the "
            "held-out questions (their last user turns)",
        }
        t["exact_dup"].settings = {"compares": "whole conversation, case, whitespace and punctuation ignored"}
        d, n = c.dedup, self.near
        t["near_dup"].settings = {
            "threshold": d.threshold,
            "prompt_threshold": d.prompt_threshold,
            "min_answer_words": d.min_answer_words,
            "compares": "answer and prompt, normalised, estimated Jaccard similarity",
            "shingles": f"{d.shingle_size} {d.shingle_unit}",
            "num_perm": d.num_perm,
            **({"lsh": f"{n.bands} bands x {n.rows} rows"} if n is not None else {}),
        }

    def _eval_prompts(self, path: str) -> HashIndex:
        """The held-out prompts, each under two keys: the whole prompt and its last user turn (the question)."""
        index = HashIndex()
        keys = []
        for _, _, row in self._parse(path, count=False):
            prompt = _prompt_turns(row)
            asked = [m["content"] for m in prompt if m["role"] == "user"]
            keys += [hash64(_joined(prompt))] + ([hash64(normalise(asked[-1]))] if asked else [])
        index.first_seen(keys, range(len(keys)))
        return index

    @staticmethod
    def _question_keys(row: dict) -> list[str]:
        """What a training row's prompt is checked under: the whole prompt, and each user turn, also without its
        leading paragraphs (a system text folded into the turn, a preamble): a held-out question asked after a
        system prompt or an earlier exchange is still a held-out question."""
        turns, keys = [], []
        for m in _prompt_turns(row):
            paragraphs = [p for p in map(normalise, m["content"].split("\n\n")) if p]  # each normalised once
            turns.append(" ".join(paragraphs))  # = normalise(content): whitespace runs fold to one space
            if m["role"] == "user":
                keys += [" ".join(paragraphs[i:]) for i in range(len(paragraphs))]
        keys.insert(0, "\n".join(turns))
        return list(dict.fromkeys(k for k in keys if k))

    # ------------------------------------------------------------------------------------ reading

    def _parse(self, path, count: bool = True):
        """Yield (line number, line to write if kept unchanged, row) for each readable row; unreadable ones raise
        or are counted. A JSONL of messages is read here line by line so a kept row is copied byte for byte; its
        messages are read as the data layer reads them (role aliases, text parts, system turns folded), and a
        row they change is written re-serialised. Other sources (formats, mappings, mixtures) go through
        posttrain.data."""
        if not _messages_jsonl(path):
            yield from self._parse_source(path, count)
            return
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if not raw.strip():
                    continue
                row = parse_line(raw)
                if not isinstance(row, BadRow):
                    try:
                        msgs = normalise_messages(row.get("messages"))
                    except RowError as err:
                        row = BadRow(err.message, err.reason)
                    else:
                        line = raw.decode("utf-8")
                        if msgs != row["messages"]:
                            row = {**row, "messages": msgs}
                            line = json.dumps(row, ensure_ascii=False, default=json_value)
                        yield lineno, line, row
                        continue
                if count:
                    text = raw.decode("utf-8", errors="replace").strip()
                    # a short reason (JSON's without the column), so the count of reasons stays small
                    reason = row.message.split(" (column")[0] if row.reason == "invalid JSON" else row.reason
                    self._unreadable(lineno, reason, f"{path}:{lineno}: {row.message}", f"[{row.message}] {text}")
                elif self.cfg.on_error == "raise":
                    raise DataError(f"{path}:{lineno}: {row.message}")

    def _parse_source(self, source, count: bool):
        # The reader skips what it cannot read (a source's own `on_error: raise` stops it); `_unreadable` decides.
        unreadable = self._unreadable if count else self._raise_or_pass
        rows = iter_rows(
            source, "conversation", need_final_assistant=False, skipped=_ReaderSkips(unreadable), on_error="skip"
        )
        for where, row in rows:
            yield _line(where), json.dumps(row, ensure_ascii=False, default=json_value), row

    def _unreadable(self, line: int, reason: str, error: str, text: str) -> None:
        """A row that could not be read as a conversation. An empty turn is the structure filter's `empty` drop
        (whatever the source's layout, as a plain messages row's empty turn is); anything else is malformed:
        it stops the run (on_error: raise) or is counted."""
        if reason == "empty content" and "structure" in self.enabled:
            self.read_and_dropped += 1
            self.tally["structure"].seen += 1
            self.tally["structure"].note(line, "empty", text)
            return
        self._raise_or_pass(line, reason, error, text)
        self.malformed.note(line, reason, text)

    def _raise_or_pass(self, line: int, reason: str, error: str, text: str) -> None:
        if self.cfg.on_error == "raise":
            raise DataError(error)

    # ---------------------------------------------------------------------------------- judging

    def _structure(self, row: dict) -> Optional[str]:
        s = self.cfg.structure
        return structure_problem(
            row, s.require_final_assistant, s.drop_unfinished, s.final_endings, s.max_chars, s.drop_control_tokens
        )

    def _judge_row(self, lineno: int, row: dict, problem: Optional[str], tokens: Optional[int]) -> tuple[bool, bool]:
        """Per-row filters in order: (kept, changed), given the row's structure problem and token count.
        Redaction edits `row` in place."""
        on, t, cfg = self.enabled, self.tally, self.cfg
        if "structure" in on:
            t["structure"].seen += 1
            if problem is None and tokens is not None and tokens > self.length.max_tokens:
                estimate = "" if self.length.tokenizer else " (estimate)"
                t["structure"].note(
                    lineno, "overlong", f"[{tokens} tokens{estimate} > {self.length.max_tokens}] {_row_text(row)}"
                )
                return False, False
            if problem:
                t["structure"].note(lineno, problem, _row_text(row))
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
        """All filters over a batch; each item is [lineno, line, row, kept, changed], updated in place."""
        structure = "structure" in self.enabled
        problems = [self._structure(b[2]) if structure else None for b in batch]
        counts: list[Optional[int]] = [None] * len(batch)
        if structure and self.count_tokens is not None:
            # only well-formed rows: a chat template may refuse the others; batched: a tokenizer is fast in bulk
            ok = [i for i, p in enumerate(problems) if p is None]
            for i, n in zip(ok, self.count_tokens([batch[i][2]["messages"] for i in ok])):
                counts[i] = n
        for b, problem, tokens in zip(batch, problems, counts):
            b[3], b[4] = self._judge_row(b[0], b[2], problem, tokens)
        alive = [b for b in batch if b[3]]
        self._normalised: dict[int, list[str]] = {}  # line -> normalised turns, shared by both dedup filters
        for name, judge in (
            ("classifier", self._classify),
            ("eval_overlap", self._eval_overlap),
            ("exact_dup", self._exact),
            ("near_dup", self._near),
        ):
            if name in self.enabled and alive:
                self.tally[name].seen += len(alive)
                judge(name, alive)
                alive = [b for b in alive if b[3]]

    def _drop(self, name: str, item: list, reason: str, text: str) -> None:
        item[3] = False
        self.tally[name].note(item[0], reason, text)

    def _classify(self, name: str, alive: list[list]) -> None:
        threshold = self.cfg.unsafe.threshold
        if self.model is not None:
            pairs = [_prompt_answer(b[2]) for b in alive]
            scores = self.model.score([p for p, _ in pairs], [a for _, a in pairs])
        else:
            texts = ["\n".join(_texts(b[2], self.cfg.unsafe.roles)) for b in alive]
            scores = score_texts(self.hook, texts, f"{self.key}.unsafe.classifier")
        self.tally[name].scores.add(scores)
        for b, score in zip(alive, scores):
            if score > threshold:
                self._drop(name, b, f"score > {threshold}", f"[{score:.3g}] {_row_text(b[2])}")

    def _eval_overlap(self, name: str, alive: list[list]) -> None:
        keys = [self._question_keys(b[2]) for b in alive]
        flat = [hash64(k) for row_keys in keys for k in row_keys]
        hits = self.eval_prompts.lookup(np.array(flat, dtype=np.uint64)).tolist()
        at = 0
        for b, row_keys in zip(alive, keys):
            found = next((k for k, hit in zip(row_keys, hits[at : at + len(row_keys)]) if hit >= 0), None)
            at += len(row_keys)
            if found is not None:
                self._drop(name, b, "prompt in eval", found)

    def _turns(self, item: list) -> list[str]:
        if item[0] not in self._normalised:
            self._normalised[item[0]] = [normalise(m["content"]) for m in item[2]["messages"]]
        return self._normalised[item[0]]

    def _exact(self, name: str, alive: list[list]) -> None:
        lines = [b[0] for b in alive]
        earlier = self.exact.first_seen([hash64("\n".join(self._turns(b))) for b in alive], lines)
        for b, first in zip(alive, earlier):
            if first is not None:
                self._drop(name, b, "duplicate", f"[duplicate of line {first}] {_row_text(b[2])}")

    def _near(self, name: str, alive: list[list]) -> None:
        prompts, answers = [], []
        for b in alive:
            turns, roles = self._turns(b), [m["role"] for m in b[2]["messages"]]
            prompts.append(" ".join(t for t, r in zip(turns, roles) if r != "assistant"))
            answers.append(" ".join(t for t, r in zip(turns, roles) if r == "assistant"))
        for b, match in zip(alive, self.near.add_batch(prompts, answers, [b[0] for b in alive])):
            if match is not None:
                self._drop(
                    name,
                    b,
                    "near duplicate",
                    f"[like line {match.line}: answer {match.answer_similarity:.2f}, prompt "
                    f"{match.prompt_similarity:.2f} similar] {_row_text(b[2])}",
                )

    # ---------------------------------------------------------------------------------- running

    def run(self, src: str | Path, dst: str | Path, on_batch: Optional[Callable[[int], None]] = None) -> dict:
        """Filter `src` into `dst` (temp file + rename); return the report. `on_batch(rows_read)` after each batch."""
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(dst)
        rows_in = kept = changed = 0
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                batch: list[list] = []
                for lineno, line, row in self._parse(src):
                    rows_in += 1
                    batch.append([lineno, line, row, True, False])
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
        if not batch:
            return 0, 0
        self._judge_batch(batch)
        kept = changed = 0
        for _, line, row, keep, was_changed in batch:
            if keep:
                text = json.dumps(row, ensure_ascii=False, default=json_value) if was_changed else line.rstrip("\r\n")
                out.write(text + "\n")
                kept, changed = kept + 1, changed + was_changed
        return kept, changed

    def _report(self, src, rows: int, kept: int, changed: int) -> dict:
        malformed, rows = self.malformed.dropped, rows + self.read_and_dropped
        return {
            "input": str(src),
            "lines": rows + malformed,
            "malformed": malformed,
            "rows": rows,
            "kept": kept,
            "dropped": rows - kept,
            "changed": changed,
            "malformed_examples": self.malformed.examples,
            "filters": {
                name: {"enabled": name in self.enabled, **tally.as_dict()} for name, tally in self.tally.items()
            },
        }
