"""The implicit reward model: a causal LM whose reward is β · mean log π(answer | prompt) (SimPO's form).

`rm.head: implicit` trains the SFT checkpoint itself, unchanged in architecture, with the same
Bradley-Terry loss as the sequence-classification head: −log σ(r_c − r_r − m) (+ centring). The reward
reads every answer token's likelihood, the signal the model already has from SFT, where a new head on
the last token must learn to verify an answer from a few hundred pairs. The saved directory is a plain
causal LM plus `reward_head.json`, which tells the scoring API to score it this way.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer

from .algos.reward import bradley_terry_loss, implicit_reward
from .engines.base import Sample
from .rollout import RolloutBatch, answer_batch, answer_tokens, pack_rollout, token_logprobs

HEAD_FILE = "reward_head.json"


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


class ImplicitRewardTrainer(Trainer):
    """transformers' Trainer (checkpoints, resume, DeepSpeed) with the Bradley-Terry loss on implicit rewards.

    Logs the same keys as TRL's RewardTrainer (accuracy, margin, mean_reward; eval_ prefixed), so the
    stage's curves and metrics read the same whichever head trained.
    """

    def __init__(self, *args, beta: float, center_coef: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.center_coef = beta, center_coef
        self._pending: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = RolloutBatch(
            inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"], engine_logprobs=None, finished=None
        )
        rewards = sequence_rewards(model, batch, self.beta)
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_coef)
        with torch.no_grad():
            stats = torch.stack([(chosen > rejected).float().mean(), (chosen - rejected).mean(), rewards.mean()])
            stats = self.accelerator.gather_for_metrics(stats.unsqueeze(0)).mean(0).tolist()
        pending = self._pending["train" if model.training else "eval"]
        for key, value in zip(("accuracy", "margin", "mean_reward"), stats):
            pending[key].append(value)
        return (loss, rewards) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._pending[mode].items() if v})
        self._pending[mode].clear()
        super().log(logs, start_time)
