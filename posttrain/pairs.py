"""Preference pairs as token ids: each pair tokenized once for every epoch, and the collator that packs a
batch of pairs as the chosen conversations, then the rejected ones (what the pair trainers and the dpo
stage's reference pass read)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engines.base import Sample
from .rollout import answer_tokens, pack_rollout


@dataclass
class TokenizedPair:
    """One preference pair as token ids: the shared prompt and the two answers (with end-of-turn)."""

    prompt: list[int]
    chosen: Sample
    rejected: Sample
    margin: float

    @property
    def length(self) -> int:
        """Tokens of the longer of the pair's two conversations."""
        return len(self.prompt) + max(len(self.chosen.token_ids), len(self.rejected.token_ids))


def tokenize_pairs(tokenizer, rows: list[dict]) -> list[TokenizedPair]:
    """Pair rows (read_pairs: both sides share the prompt turns) tokenized once, for every epoch."""
    prompts, chosen = answer_tokens(tokenizer, [{"messages": r["chosen"]} for r in rows])
    _, rejected = answer_tokens(tokenizer, [{"messages": r["rejected"]} for r in rows])
    return [
        TokenizedPair(p, c, r, float(row.get("margin", 0.0)))
        for p, c, r, row in zip(prompts, chosen, rejected, rows, strict=True)
    ]


class PairCollator:
    """Pairs -> one right-padded batch: the chosen conversations, then the rejected ones (+ margins)."""

    def __init__(self, pad_id: int, use_margin: bool):
        self.pad_id, self.use_margin = pad_id, use_margin

    def __call__(self, pairs: list[TokenizedPair]) -> dict:
        packed = pack_rollout(
            [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_id
        )
        batch = {
            "input_ids": packed.input_ids,
            "attention_mask": packed.attention_mask,
            "response_mask": packed.response_mask,
        }
        if self.use_margin:
            batch["margin"] = torch.tensor([p.margin for p in pairs])
        return batch
