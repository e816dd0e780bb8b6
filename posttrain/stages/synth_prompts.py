"""synth from a prompt set: a teacher answers the user's own prompts (the Gemma recipe's first step).

Prompts are read as prompt-only conversations (a final assistant turn in the source is dropped), deduplicated
by their normalised text, and split train/held-out with a seeded draw (no prompt on both sides). The teacher
answers every distinct prompt in shards of `shard_size` prompts; each shard is written to
`run_dir/synth/shards/shard-NNNNN.jsonl` (temp file + rename) as soon as it is answered. A run killed part-way
re-runs with its directory kept (the pipeline resumes a stage whose manifest says `running`), reuses the shards
already written and generates only the rest. Shard k always holds the same prompts, generated in one call
seeded by its first prompt's position, so the final files equal an uninterrupted run's.

Other columns of a prompt ride along as metadata; each answer keeps the teacher's `finished` flag (false:
cut off at max_new_tokens), which the filter stage's structure filter drops by default.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from ..config import ConfigError
from ..data import SkipReport, read_rows, write_jsonl
from ..data.prompts import dedup_prompts, held_out_count, prompt_text_key, split_held_out
from ..dist.rank import all_gather_objects

log = logging.getLogger("posttrain")
SHARD_NAME = "shard-{:05d}.jsonl"
"""File name of shard k under run_dir/synth/shards/."""


def read_prompt_set(
    source, num_eval: Optional[int], eval_fraction: Optional[float], seed: int
) -> tuple[list[dict], list[bool], dict]:
    """The distinct prompt rows of a source in input order, a parallel list of held-out flags (seeded), and
    counts for the data card: rows read, rows the reader skipped, duplicates dropped, distinct prompts."""
    skipped = SkipReport()
    rows = read_rows(source, "prompt", skipped=skipped, seed=seed)
    distinct, duplicates = dedup_prompts(rows)
    try:
        n_eval = held_out_count(len(distinct), num_eval, eval_fraction)
    except ValueError as err:
        raise ConfigError(f"synth.{err} ({len(rows)} prompts read, {duplicates} duplicates dropped)") from None
    _, held = split_held_out(list(range(len(distinct))), n_eval, seed)
    held_set = set(held)
    counts = {
        "read": skipped.read,
        "skipped_unreadable": skipped.skipped,
        "duplicates_dropped": duplicates,
        "distinct": len(distinct),
    }
    return distinct, [i in held_set for i in range(len(distinct))], counts


def write_shard(path: Path, records: list[dict]) -> None:
    """Write one shard atomically (temp file + rename): a killed run leaves whole shards or none."""
    write_jsonl(path, records)


def _read_shard(path: Path, keys: list[str]) -> Optional[list[dict]]:
    """A shard's records when it holds exactly the prompts expected (by key, in order); else None."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if [r.get("key") for r in records] != keys or not all(isinstance(r.get("text"), str) for r in records):
        return None
    return records


class ShardedAnswers:
    """The teacher's answers to a fixed list of prompts, generated shard by shard and written as they come.

    `generate(prompts, first_index)` returns one (text, finished) per prompt; every rank calls it for the same
    shards (a collective under ranks), rank 0 writes. Which shards are missing is decided by rank 0 and shared,
    so all ranks generate the same ones.
    """

    def __init__(self, shard_dir: Path, prompts: list[list[dict]], shard_size: int, is_main: bool):
        self.dir, self.prompts, self.size, self.is_main = shard_dir, prompts, shard_size, is_main
        self.keys = [prompt_text_key(p) for p in prompts]
        self.num_shards = (len(prompts) + shard_size - 1) // shard_size

    def _bounds(self, k: int) -> tuple[int, int]:
        return k * self.size, min((k + 1) * self.size, len(self.prompts))

    def _written(self) -> dict[int, list[dict]]:
        """Shards already on disk that match their prompts (rank 0); stray temp files of a killed write removed."""
        found: dict[int, list[dict]] = {}
        if not self.is_main:
            return found
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(".shard-*.tmp"):
            tmp.unlink(missing_ok=True)
        for k in range(self.num_shards):
            path = self.dir / SHARD_NAME.format(k)
            if path.is_file():
                start, end = self._bounds(k)
                records = _read_shard(path, self.keys[start:end])
                if records is None:
                    log.warning("[synth] %s does not hold the prompts expected; answering them again", path)
                else:
                    found[k] = records
        return found

    def run(self, generate: Callable[[list[list[dict]], int], list[tuple[str, bool]]]) -> tuple[list[dict], dict]:
        """All answers in prompt order (rank 0; other ranks get []), and counts of what was generated now."""
        written = self._written()
        missing = all_gather_objects(sorted(set(range(self.num_shards)) - set(written)))[0]  # rank 0's view
        reused = sum(self._bounds(k)[1] - self._bounds(k)[0] for k in written)
        if written:
            log.info(
                "[synth] resuming: %d of %d shards already answered (%d prompts); answering the other %d prompts",
                len(written),
                self.num_shards,
                reused,
                len(self.prompts) - reused,
            )
        generated = 0
        for k in missing:
            start, end = self._bounds(k)
            answers = generate(self.prompts[start:end], start)
            generated += end - start
            if self.is_main:
                records = [
                    {"i": start + j, "key": self.keys[start + j], "text": text, "finished": bool(done)}
                    for j, (text, done) in enumerate(answers)
                ]
                write_shard(self.dir / SHARD_NAME.format(k), records)
                written[k] = records
                log.info("[synth] shard %d/%d written (%d prompts)", k + 1, self.num_shards, end - start)
        out = [r for k in sorted(written) for r in written[k]] if self.is_main else []
        return out, {
            "shards": self.num_shards,
            "shards_reused": self.num_shards - len(missing),
            "prompts_generated": generated,
            "prompts_reused": reused,
        }


def answered_rows(prompt_rows: list[dict], answers: list[dict]) -> tuple[list[dict], int]:
    """Prompt rows completed with the teacher's answers (metadata kept, `finished` set; None where the answer
    is empty: a conversation turn must have content), and how many answers were empty."""
    rows, empty = [], 0
    for row, answer in zip(prompt_rows, answers, strict=True):
        if not answer["text"].strip():
            empty += 1
            rows.append(None)
            continue
        meta = {k: v for k, v in row.items() if k != "messages"}
        rows.append(
            {
                "messages": row["messages"] + [{"role": "assistant", "content": answer["text"]}],
                **meta,
                "finished": answer["finished"],
            }
        )
    return rows, empty
