"""Trainers on preference pairs (`pairs`): transformers' Trainer (checkpoints, resume, DeepSpeed) with the
Bradley-Terry loss on implicit rewards (the `rm` stage's implicit head) and with SimPO's loss (the `dpo`
stage's `loss_type: simpo`). Imported only where a trainer is built: Trainer brings `datasets`, pandas,
pyarrow and peft with it (~350 MiB of RSS at import), which a process that scores with an implicit reward
model or runs the RL stage does not need (at vocabulary 262144 they were 118 MiB of its peak).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from transformers import Trainer

from .algos.reward import bradley_terry_loss, implicit_reward, simpo_loss
from .dist.trainable import forward_through
from .implicit_rm import sequence_rewards
from .rollout import RolloutBatch, token_logprobs


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
        rewards = forward_through(model, sequence_rewards, batch, self.beta)
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_coef)
        with torch.no_grad():
            stats = torch.stack([(chosen > rejected).float().mean(), (chosen - rejected).mean(), rewards.mean()])
            self._note(model, ("accuracy", "margin", "mean_reward"), stats, chosen.numel())
        return (loss, rewards) if return_outputs else loss

    def _note(self, model, keys, means: torch.Tensor, pairs: int) -> None:
        """Keep one batch's means with its pair count, summed over ranks: `log` then reports means over pairs
        (a mean of batch means would weight a short last batch like a full one)."""
        local = torch.cat([means * pairs, means.new_tensor([pairs])])
        total = self.accelerator.gather_for_metrics(local.unsqueeze(0)).sum(0).tolist()
        pending = self._pending["train" if model.training else "eval"]
        for key, value in zip(keys, total[:-1]):
            pending[key].append((value, total[-1]))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update(
            {prefix + k: sum(s for s, _ in v) / sum(n for _, n in v) for k, v in self._pending[mode].items() if v}
        )
        self._pending[mode].clear()
        super().log(logs, start_time)


class SimPOTrainer(ImplicitRewardTrainer):
    """SimPO on transformers' Trainer (checkpoints, resume, DeepSpeed): the implicit-reward trainer's
    batches (chosen conversations, then rejected) with `simpo_loss`, logging TRL's DPO metric keys."""

    def __init__(self, *args, gamma: float, sft_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma, self.sft_weight = gamma, sft_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = RolloutBatch(inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"], None, None)
        logp, mask = forward_through(model, token_logprobs, batch).chunk(2), batch.response_mask.chunk(2)
        loss = simpo_loss(logp[0], mask[0], logp[1], mask[1], self.beta, self.gamma)
        if self.sft_weight:  # the chosen answers' mean token NLL, as TRL's "sft" loss term
            loss = loss - self.sft_weight * (logp[0] * mask[0]).sum() / mask[0].sum().clamp(min=1)
        with torch.no_grad():
            r_c, r_r = (implicit_reward(lp, m, self.beta) for lp, m in zip(logp, mask))
            sums = [(lp * m).sum(-1) for lp, m in zip(logp, mask)]
            stats = torch.stack(
                [r_c.mean(), r_r.mean(), (r_c - r_r).mean(), (r_c > r_r).float().mean(), sums[0].mean(), sums[1].mean()]
            )
        keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
        self._note(model, keys + ("logps/chosen", "logps/rejected"), stats, r_c.numel())
        return (loss, None) if return_outputs else loss
