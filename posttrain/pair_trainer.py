"""Trainers on preference pairs (`pairs`): transformers' Trainer (checkpoints, resume, DeepSpeed) with the
Bradley-Terry loss on implicit rewards (the `rm` stage's implicit head) and with SimPO's loss (the `dpo`
stage's `loss_type: simpo`), and TRL's RewardTrainer (the sequence-classification head); each logs its pair
statistics as means over pairs. Imported only where a trainer is built: Trainer brings `datasets`, pandas,
pyarrow and peft with it (~350 MiB of RSS at import), which a process that scores with an implicit reward
model or runs the RL stage does not need (at vocabulary 262144 they were 118 MiB of its peak).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from transformers import Trainer
from trl import RewardTrainer

from .algos.reward import bradley_terry_loss, implicit_reward, simpo_loss
from .dist.trainable import forward_through
from .implicit_rm import sequence_rewards
from .rollout import RolloutBatch, token_logprobs


class PairMeans:
    """For trainers on preference pairs: statistics noted per pair and logged as means over pairs.

    Gathered per pair, not per rank, because `gather_for_metrics` then drops the samples a last batch repeats
    to give every rank a full one; and summed, because a mean of batch means weights a short last batch like
    a full one (the logged accuracy then differs from the held-out accuracy over the same pairs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: dict[str, dict[str, list[tuple[float, int]]]] = {m: defaultdict(list) for m in ("train", "eval")}

    def _note(self, model, per_pair: dict[str, torch.Tensor]) -> None:
        """Keep each statistic's sum over this batch's pairs of every rank, with the pair count."""
        gathered = self.accelerator.gather_for_metrics(torch.stack([v.detach().float() for v in per_pair.values()], 1))
        pending = self._pending["train" if model.training else "eval"]
        for key, total in zip(per_pair, gathered.sum(0).tolist()):
            pending[key].append((total, gathered.shape[0]))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update(
            {prefix + k: sum(s for s, _ in v) / sum(n for _, n in v) for k, v in self._pending[mode].items() if v}
        )
        self._pending[mode].clear()
        super().log(logs, start_time)


class PairMeanRewardTrainer(PairMeans, RewardTrainer):
    """TRL's RewardTrainer (the sequence-classification head) with its accuracy, margin and mean_reward logged
    as means over pairs (`PairMeans`); TRL logs means of batch means. Its other keys stay TRL's."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        metrics = self._metrics["train" if self.model.training else "eval"]
        for key in ("accuracy", "margin", "mean_reward"):
            metrics.pop(key, None)  # noted here instead
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        per_pair = {"accuracy": (chosen > rejected).float(), "margin": chosen - rejected}
        self._note(model, {**per_pair, "mean_reward": (chosen + rejected) / 2})
        return (loss, outputs) if return_outputs else loss


class ImplicitRewardTrainer(PairMeans, Trainer):
    """transformers' Trainer (checkpoints, resume, DeepSpeed) with the Bradley-Terry loss on implicit rewards.

    Logs the same keys as TRL's RewardTrainer (accuracy, margin, mean_reward; eval_ prefixed), so the
    stage's curves and metrics read the same whichever head trained.
    """

    def __init__(self, *args, beta: float, center_coef: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.center_coef = beta, center_coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = RolloutBatch(
            inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"], engine_logprobs=None, finished=None
        )
        rewards = forward_through(model, sequence_rewards, batch, self.beta)
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_coef)
        per_pair = {"accuracy": (chosen > rejected).float(), "margin": chosen - rejected}
        self._note(model, {**per_pair, "mean_reward": (chosen + rejected) / 2})
        return (loss, rewards) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None


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
            logps = [(lp * m).sum(-1) for lp, m in zip(logp, mask)]
        per_pair = {"rewards/chosen": r_c, "rewards/rejected": r_r, "rewards/margins": r_c - r_r}
        per_pair["rewards/accuracies"] = (r_c > r_r).float()
        self._note(model, {**per_pair, "logps/chosen": logps[0], "logps/rejected": logps[1]})
        return (loss, None) if return_outputs else loss
