"""The implicit reward model: a causal LM whose reward is β · mean log π(answer | prompt) (SimPO's form).

`rm.head: implicit` trains the SFT checkpoint itself, unchanged in architecture, with the same
Bradley-Terry loss as the sequence-classification head: −log σ(r_c − r_r − m) (+ centring). The reward
reads every answer token's likelihood, the signal the model already has from SFT, where a new head on
the last token must learn to verify an answer from a few hundred pairs. The saved directory is a plain
causal LM plus `reward_head.json`, which tells the scoring API to score it this way.

Scoring only: training on preference pairs is in `pair_trainer`, which imports transformers' Trainer (and
with it `datasets`, pandas, pyarrow and peft) that a stage scoring with this model never needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .algos.reward import implicit_reward
from .paths import REWARD_HEAD_FILE
from .rollout import RolloutBatch, answer_batch, token_logprobs

HEAD_FILE = REWARD_HEAD_FILE


def write_reward_head(model_dir: str | Path, beta: float) -> None:
    (Path(model_dir) / HEAD_FILE).write_text(json.dumps({"head": "implicit", "beta": beta}) + "\n")


def read_reward_head(model_dir: str | Path) -> Optional[dict]:
    """The implicit head's settings when `model_dir` holds an implicit reward model, else None."""
    path = Path(model_dir) / HEAD_FILE
    if not path.is_file():
        return None
    head = json.loads(path.read_text())
    if head.get("head") != "implicit" or not isinstance(head.get("beta"), (int, float)):
        raise ValueError(f'{path}: expected {{"head": "implicit", "beta": <number>}}, got {head}')
    return head


def sequence_rewards(model, batch: RolloutBatch, beta: float) -> torch.Tensor:
    """(B,) implicit rewards of a packed batch under `model`."""
    return implicit_reward(token_logprobs(model, batch), batch.response_mask, beta)


@torch.no_grad()
def implicit_scores(model, tokenizer, conversations: list[list[dict]], beta: float, batch_size: int) -> torch.Tensor:
    """Implicit rewards of whole conversations (prompt turns + the answer to score), in batches, on the
    model's device; returned on the CPU."""
    device, out = next(model.parameters()).device, []
    for i in range(0, len(conversations), batch_size):
        batch = answer_batch(tokenizer, [{"messages": c} for c in conversations[i : i + batch_size]], device)
        out.append(sequence_rewards(model, batch, beta).cpu())
    return torch.cat(out) if out else torch.zeros(0)
