"""One RL update's tensors and losses, apart from the stage's bookkeeping.

`Rollout` is what an update computes before optimising: the packed batch, its scores, the logprobs the
rollout policy and the reference gave its tokens, values, advantages and returns. `policy_objective` is
the policy loss of one mini-batch for every member of the family the config selects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...algos import grpo as G
from ...algos import ppo as F
from ...rollout import RolloutBatch
from .config import PPOConfig


@dataclass
class Rollout:
    """One update's batch and everything computed from it before the optimiser steps (all (B, T) unless noted)."""

    batch: RolloutBatch
    score: torch.Tensor
    """(B,) reward of each sequence, shaping included (end-of-turn and overlong penalties)."""
    adv: torch.Tensor
    """Advantages at response tokens (critic-free: the sequence's advantage on each of its tokens)."""
    old_logp: Optional[torch.Tensor]
    """Rollout policy logprobs (tempered); None when there is one optimiser step per rollout: the
    training forward's own (detached) logprobs are then exactly these."""
    ref_logp: Optional[torch.Tensor]
    """Reference logprobs; None when no KL term uses them."""
    values: Optional[torch.Tensor] = None
    """Value predictions at rollout time (GAE only)."""
    returns: Optional[torch.Tensor] = None
    """Lambda-returns, the value targets (GAE only)."""
    is_weight: Optional[torch.Tensor] = None
    """Truncated importance weights correcting the engine/trainer mismatch (None: not computed here)."""
    seq_kl: Optional[torch.Tensor] = None
    """(B,) summed per-token KL estimate to the reference (None when no reference is used)."""
    logprob_gap: float = 0.0
    """Mean |trainer - engine| raw logprob over response tokens (0 when the engine reported none)."""

    def rows(self, idx: torch.Tensor) -> dict:
        """The per-row tensors of a mini-batch."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return {
            "adv": self.adv[idx],
            "old_logp": pick(self.old_logp),
            "ref_logp": pick(self.ref_logp),
            "values": pick(self.values),
            "returns": pick(self.returns),
            "is_weight": pick(self.is_weight),
        }


def sequence_rewards_with_kl(
    score: torch.Tensor, kl: Optional[torch.Tensor], kl_coef: float, cfg: PPOConfig
) -> torch.Tensor:
    """(B,) the reward critic-free advantages compare: the score, minus beta * summed KL in reward mode."""
    if cfg.kl_mode == "reward" and kl is not None:
        return score - kl_coef * kl.sum(1)
    return score


def critic_free_advantages(seq_reward: torch.Tensor, mask: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """RLOO or GRPO advantages of each sequence, spread over its response tokens."""
    n = cfg.sampling.n
    if cfg.advantage == "rloo":
        adv = F.rloo_advantages(seq_reward, n)
    else:
        adv = G.grpo_advantages(seq_reward, n, scale_by_std=cfg.scale_by_std)
    return adv[:, None] * mask


def policy_objective(
    cfg: PPOConfig, logp: torch.Tensor, rows: dict, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, dict]:
    """The policy loss of one mini-batch and its diagnostics.

    Token-level ratios (PPO, GRPO, DAPO) or GSPO's sequence-level ratio; asymmetric clipping; the
    configured loss aggregation; truncated importance weights; and in kl_mode 'loss' beta * k3 KL.
    """
    old = rows["old_logp"] if rows["old_logp"] is not None else logp.detach()
    clip_low, clip_high = cfg.clip_low or cfg.clip_eps, cfg.clip_high or cfg.clip_eps
    log_ratio = logp - old
    if cfg.ratio_level == "sequence":
        seq_adv = F.masked_mean(rows["adv"], mask, dim=1)
        per_seq, clipped = G.clipped_surrogate(
            G.sequence_log_ratio(logp, old, mask).exp(), seq_adv, clip_low, clip_high
        )
        if rows["is_weight"] is not None:  # a sequence's mismatch correction: its tokens' mean weight
            per_seq = per_seq * F.masked_mean(rows["is_weight"], mask, dim=1)
        pg_loss, clip_fraction = per_seq.mean(), clipped.to(logp.dtype).mean()
    else:
        per_token, clipped = G.clipped_surrogate(log_ratio.exp(), rows["adv"], clip_low, clip_high)
        if rows["is_weight"] is not None:
            per_token = per_token * rows["is_weight"]
        pg_loss = G.aggregate(per_token, mask, cfg.loss_aggregation, cfg.sampling.max_new_tokens)
        clip_fraction = F.masked_mean(clipped.to(logp.dtype), mask)
    stats = {
        "policy_loss": pg_loss.detach(),
        "clip_fraction": clip_fraction.detach(),
        "approx_kl": F.masked_mean((torch.expm1(log_ratio) - log_ratio).detach(), mask),
    }
    loss = pg_loss
    if cfg.kl_mode == "loss" and rows["ref_logp"] is not None and kl_coef > 0:
        kl_term = G.aggregate(
            G.kl_k3_loss_term(logp, rows["ref_logp"]), mask, cfg.loss_aggregation, cfg.sampling.max_new_tokens
        )
        stats["kl_loss"] = kl_term.detach()
        loss = loss + kl_coef * kl_term
    return loss, stats
