"""The teacher's side of distillation: shared vocabulary check, tokenized loss positions, the offline
top-k cache of teacher log-probabilities, and held-out NLL / KL-to-teacher measurements.

Positions: logits at position t predict token t+1, so a sequence's *loss positions* are the t whose
label[t+1] is an assistant token (labels != -100, the same assistant-only labels SFT trains on).

Cache layout (one directory per key, written atomically):
    <root>/<key>/topk.safetensors   indices int32 (N, k), logprobs float16 (N, k), positions int32 (N,),
                                    row_offsets int64 (R+1,): row r owns entries row_offsets[r]:row_offsets[r+1]
    <root>/<key>/index.json         what the key was made of, sizes, build time
The key hashes the teacher directory's content, the data file, the tokenizer, k, temperature and
max_length: the same inputs find the same directory (reuse), any change finds a new one (rebuild).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .algos.kd import forward_kl, topk_teacher
from .algos.logits import chunk_tokens_for, softcap
from .manifest import atomic_dir, hash_json, hash_path
from .rollout import hidden_at

log = logging.getLogger("posttrain")

CACHE_FORMAT = 1
"""Bumped when the cache layout or the way positions are derived changes (old caches then rebuild)."""


# ----------------------------------------------------------------------------------------------
# Vocabulary and tokenization


def check_same_vocab(
    student_dir: str, teacher_dir: str, student_tok, teacher_tok, student_vocab_size: int, teacher_vocab_size: int
) -> None:
    """Refuse a student/teacher pair whose token -> id maps or output sizes differ (ValueError)."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        s_by_id = {i: tok for tok, i in s_vocab.items()}
        t_by_id = {i: tok for tok, i in t_vocab.items()}
        first = next(i for i in sorted(set(s_by_id) | set(t_by_id)) if s_by_id.get(i) != t_by_id.get(i))
        token = s_by_id.get(first) if s_by_id.get(first) is not None else t_by_id.get(first)
        raise ValueError(
            f"student {student_dir} and teacher {teacher_dir} do not share a vocabulary: first differing token "
            f"{token!r} has id {s_vocab.get(token, 'none')} in the student and {t_vocab.get(token, 'none')} in the "
            f"teacher (student id {first} is {s_by_id.get(first)!r}, teacher id {first} is {t_by_id.get(first)!r}). "
            f"Distillation compares next-token distributions id by id: build the student with the teacher's "
            f"tokenizer"
        )
    if student_vocab_size != teacher_vocab_size:
        raise ValueError(
            f"student {student_dir} has {student_vocab_size} output logits but teacher {teacher_dir} has "
            f"{teacher_vocab_size}: the same tokenizer, but differently padded embeddings"
        )


def tokenize_for_loss(tokenizer, rows: list[dict]) -> list[dict]:
    """Each conversation as {input_ids, labels, row_id}: labels are -100 except assistant tokens.

    The same masking SFT trains with (TRL's `{% generation %}` variant of the Gemma template), whole (the
    stage leaves out those longer than its max_length); rows without an assistant token to learn are dropped.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = None if has_generation_markers(tokenizer.chat_template) else get_training_chat_template(tokenizer)
    out = []
    for row_id, row in enumerate(rows):
        enc = tokenizer.apply_chat_template(
            row["messages"], chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(enc["input_ids"])
        labels = [t if m else -100 for t, m in zip(ids, enc["assistant_masks"])]
        if any(label != -100 for label in labels[1:]):
            out.append({"input_ids": ids, "labels": labels, "row_id": row_id})
    return out


def loss_positions(labels: list[int]) -> list[int]:
    """Positions t whose logits are trained: the next token t+1 is an assistant token."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != -100]


def pad_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad_id), labels (-100) and build the attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], attention[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


# ----------------------------------------------------------------------------------------------
# The offline top-k cache


@dataclass
class TopKCache:
    """Teacher top-k log-probabilities at the loss positions of every training row."""

    indices: torch.Tensor
    """(N, k) int32 token ids, most likely first."""
    logprobs: torch.Tensor
    """(N, k) float16 log-probabilities at the cache temperature, renormalised over the k tokens."""
    positions: torch.Tensor
    """(N,) int32 position within its row of each entry."""
    row_offsets: torch.Tensor
    """(R+1,) int64: row r's entries are [row_offsets[r], row_offsets[r+1])."""

    def row(self, row_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start, end = int(self.row_offsets[row_id]), int(self.row_offsets[row_id + 1])
        return self.positions[start:end], self.indices[start:end], self.logprobs[start:end]

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {
                "indices": self.indices,
                "logprobs": self.logprobs,
                "positions": self.positions,
                "row_offsets": self.row_offsets,
            },
            str(folder / "topk.safetensors"),
        )

    @classmethod
    def load(cls, folder: Path) -> "TopKCache":
        from safetensors.torch import load_file

        return cls(**load_file(str(folder / "topk.safetensors")))


def cache_key(teacher_dir: str, data_path: str, tokenizer, k: int, temperature: float, max_length: int) -> dict:
    """Everything the cached values depend on; `hash_json` of it names the cache directory."""
    import trl

    tok_fp = hash_json(
        {"vocab": tokenizer.get_vocab(), "template": tokenizer.chat_template, "special": tokenizer.all_special_tokens}
    )
    return {
        "format": CACHE_FORMAT,
        "teacher": hash_path(teacher_dir),
        "data": hash_path(data_path),
        "tokenizer": tok_fp,
        "k": k,
        "temperature": temperature,
        "max_length": max_length,
        "trl": trl.__version__,
    }


def cache_dir_for(root: Path, key: dict) -> Path:
    return Path(root) / hash_json(key)


def find_cache(root: Path, key: dict) -> Optional[Path]:
    """The complete cache directory for `key`, if one exists (index.json is written last)."""
    folder = cache_dir_for(root, key)
    return folder if (folder / "index.json").is_file() and (folder / "topk.safetensors").is_file() else None


def _loss_mask(batch: dict) -> torch.Tensor:
    """(B, T-1) bool: the positions whose logits are trained (the next token is an assistant token)."""
    return batch["labels"][:, 1:] != -100


def _chunks(hidden: torch.Tensor, head, cap, vocab: int):
    """(start, fp32 logits) of `hidden`'s positions, one chunk of the output head at a time."""
    step = chunk_tokens_for(vocab)
    for start in range(0, hidden.shape[0], step):
        yield start, softcap(head(hidden[start : start + step]).float(), cap)


@torch.no_grad()
def compute_topk(
    teacher, examples: list[dict], num_rows: int, k: int, temperature: float, pad_id: int, batch_size: int = 32
) -> TopKCache:
    """Teacher top-k (renormalised, at `temperature`) at each loss position of each example, from chunks of
    the teacher's output head (no [batch, seq, vocab] logits).

    `num_rows` is the number of rows in the data file: rows that tokenization dropped get no entries.
    """
    was_training = teacher.training
    teacher.eval()
    by_row: dict[int, tuple] = {}
    device = next(teacher.parameters()).device
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {key: v.to(device) for key, v in pad_batch(chunk, pad_id).items()}
        where = _loss_mask(batch)
        hidden, head, cap, vocab = hidden_at(teacher, batch["input_ids"], batch["attention_mask"], where)
        parts = [topk_teacher(logits, k, temperature) for _, logits in _chunks(hidden, head, cap, vocab)]
        idx = torch.cat([p[0] for p in parts]).cpu() if parts else torch.zeros(0, k, dtype=torch.long)
        lp = torch.cat([p[1] for p in parts]).cpu() if parts else torch.zeros(0, k)
        offset = 0
        for ex, count in zip(chunk, where.sum(1).tolist()):
            pos = torch.tensor(loss_positions(ex["labels"]), dtype=torch.long)
            by_row[ex["row_id"]] = (pos, idx[offset : offset + count], lp[offset : offset + count])
            offset += count
    teacher.train(was_training)
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
    parts = [by_row.get(r, empty) for r in range(num_rows)]
    counts = torch.tensor([0] + [len(p[0]) for p in parts], dtype=torch.int64)
    return TopKCache(
        indices=torch.cat([p[1] for p in parts]).to(torch.int32),
        logprobs=torch.cat([p[2] for p in parts]).to(torch.float16),
        positions=torch.cat([p[0] for p in parts]).to(torch.int32),
        row_offsets=torch.cumsum(counts, 0),
    )


def open_or_build_cache(
    root: Path, key: dict, build: Callable[[], TopKCache], about: Optional[dict] = None
) -> tuple[TopKCache, str, Path]:
    """Load the cache for `key` ('reused'), or call `build` and store it atomically ('built').

    `about` (e.g. the teacher and data paths) is recorded in index.json for people, not in the key."""
    found = find_cache(root, key)
    if found is not None:
        log.info("[distill] teacher top-k cache reused: %s", found)
        return TopKCache.load(found), "reused", found
    folder = cache_dir_for(root, key)
    log.info("[distill] building the teacher top-k cache (k=%d, T=%g) -> %s", key["k"], key["temperature"], folder)
    started = time.time()
    cache = build()
    with atomic_dir(folder) as tmp:
        cache.save(tmp)
        index = {
            "key": key,
            **(about or {}),
            "rows": len(cache.row_offsets) - 1,
            "entries": len(cache.positions),
            "bytes": (tmp / "topk.safetensors").stat().st_size,
            "build_seconds": round(time.time() - started, 2),
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return cache, "built", folder


class TopKCollator:
    """Wrap a padding collator: add the cached teacher top-k, aligned with the batch, as dense tensors.

    Adds `topk_indices` (B, T-1, k) long and `topk_logprobs` (B, T-1, k) float32 for logit positions
    0..T-2; positions without a target hold a uniform dummy (masked out by the labels anyway).
    Examples without `row_id` (held-out batches) pass through unchanged.
    """

    def __init__(self, base, cache: Optional[TopKCache] = None):
        self.base, self.cache = base, cache

    def __call__(self, examples: list[dict]) -> dict:
        row_ids = [e.get("row_id") for e in examples]
        batch = self.base([{k: v for k, v in e.items() if k != "row_id"} for e in examples])
        if self.cache is None or any(r is None for r in row_ids):
            return batch
        bsz, width = batch["input_ids"].shape
        k = self.cache.indices.shape[1]
        indices = torch.zeros((bsz, width - 1, k), dtype=torch.long)
        logprobs = torch.full((bsz, width - 1, k), -math.log(k))
        for i, (row_id, ex) in enumerate(zip(row_ids, examples)):
            pos, idx, lp = self.cache.row(row_id)
            if pos.tolist() != loss_positions(list(ex["labels"])):
                raise ValueError(
                    f"teacher top-k cache does not match training row {row_id}: it was built from "
                    f"different tokens (delete the cache directory to rebuild it)"
                )
            indices[i, pos.long()] = idx.long()
            logprobs[i, pos.long()] = lp.float()
        batch["topk_indices"], batch["topk_logprobs"] = indices, logprobs
        return batch


# ----------------------------------------------------------------------------------------------
# Held-out measurements


@torch.no_grad()
def heldout_metrics(student, teacher, examples: list[dict], pad_id: int, batch_size: int = 32) -> dict:
    """Token-weighted held-out NLL and perplexity of the student on the reference answers, and its
    forward KL(teacher || student) at T=1 over the full vocabulary at the same positions (if a teacher),
    from chunks of the output heads (no [batch, seq, vocab] logits)."""
    models = [m for m in (student, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(student.parameters()).device
    nll_sum, kl_sum, tokens = 0.0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[start : start + batch_size], pad_id).items()}
        where = _loss_mask(batch)
        targets = batch["labels"][:, 1:][where]
        s_hidden, s_head, s_cap, vocab = hidden_at(student, batch["input_ids"], batch["attention_mask"], where)
        if teacher is not None:
            t_hidden, t_head, t_cap, _ = hidden_at(teacher, batch["input_ids"], batch["attention_mask"], where)
        for first, logits in _chunks(s_hidden, s_head, s_cap, vocab):
            n = logits.shape[0]
            nll_sum += float(torch.nn.functional.cross_entropy(logits, targets[first : first + n], reduction="sum"))
            if teacher is not None:
                t_logits = softcap(t_head(t_hidden[first : first + n]).float(), t_cap)
                ones = torch.ones(1, n, dtype=torch.bool, device=logits.device)
                kl_sum += float(forward_kl(logits[None], t_logits[None], ones)) * n
        tokens += int(where.sum())
    for m, mode in zip(models, modes):
        m.train(mode)
    nll = nll_sum / max(tokens, 1)
    out = {"nll": round(nll, 4), "perplexity": round(math.exp(nll), 4), "tokens": tokens}
    if teacher is not None:
        out["kl_to_teacher"] = round(kl_sum / max(tokens, 1), 4)
    return out
