"""Prompt sets: the comparison form of a prompt, exact deduplication and a seeded train/held-out split.

A prompt is the conversation up to its last user turn (`conversations.prompt_of`). Two prompts count as the
same when their turns are equal after folding case and whitespace and dropping a final period, which is
how the prefs stage keeps train and held-out prompts apart too.
"""

from __future__ import annotations

import random
from typing import Optional

from ..tasks import normalise_answer
from .conversations import prompt_of


def prompt_text_key(messages: list[dict]) -> str:
    """The comparison form of a prompt's turns (roles left out: a prompt is its text)."""
    return "\n".join(normalise_answer(m["content"]) for m in messages)


def row_prompt_key(row: dict) -> str:
    """The comparison form of a conversation row's prompt (its turns before any final answer)."""
    return prompt_text_key(prompt_of(row))


def has_reference(row: dict) -> bool:
    """True when a conversation row ends on an assistant turn: a reference answer to its prompt."""
    msgs = row.get("messages") or []
    return bool(msgs) and msgs[-1]["role"] == "assistant"


def dedup_prompts(rows: list[dict]) -> tuple[list[dict], int]:
    """The rows whose prompt was not seen before (first occurrence kept, order kept), and how many were dropped."""
    seen, kept = set(), []
    for row in rows:
        key = row_prompt_key(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def held_out_count(n: int, num_eval: Optional[int], eval_fraction: Optional[float]) -> int:
    """How many of `n` distinct prompts to hold out: `eval_fraction` of them (rounded, at least 1) when set,
    else `num_eval`; at least one prompt always stays for training."""
    want = max(1, round(n * eval_fraction)) if eval_fraction is not None else (num_eval or 0)
    if want >= n:
        asked = f"eval_fraction {eval_fraction}" if eval_fraction is not None else f"num_eval {num_eval}"
        raise ValueError(f"{asked} holds out {want} of {n} distinct prompts, leaving none to train on; hold out fewer")
    return want


def split_held_out(rows: list[dict], num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) of distinct-prompt rows: a seeded random `num_eval` are held out, each side kept in
    input order. Rows must be deduplicated first, so no prompt is on both sides."""
    picked = set(random.Random(f"held-out-{seed}").sample(range(len(rows)), num_eval))
    return ([r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked])
