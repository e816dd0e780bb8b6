"""Critic-free policy optimisation: the GRPO family's advantages, ratios, clipping, loss aggregation and
reward shaping, as pure functions of tensors.

Shapes: B sequences (the samples of one prompt in consecutive rows, `group_size` per prompt), T tokens;
`mask` is (B, T) with 1 at response tokens.

Sources:
- Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models" (GRPO: group-normalised advantages, per-sequence mean loss, k3 KL in the loss).
- Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (clip-higher,
  dynamic sampling, token-level loss, overlong reward shaping).
- Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO: no std
  scaling, a constant loss normaliser).
- Zheng et al. 2025, "Group Sequence Policy Optimization" (GSPO: a sequence-level, length-normalised
  importance ratio).
- Schulman 2020, "Approximating KL Divergence" (the k3 estimator).
"""

from __future__ import annotations

from typing import Literal

import torch

LossAggregation = Literal["token_mean", "sequence_mean", "constant"]


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError("group advantages compare samples of one prompt: group_size (sampling.n) must be >= 2")
    if x.numel() % group_size:
        raise ValueError(f"{x.numel()} rewards do not split into groups of {group_size}")
    return x.view(-1, group_size)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Each sample's reward minus its group's mean, divided by the group's standard deviation.

    rewards: (B,) -> (B,).  A_i = (r_i - mean_g r) / (std_g r + eps)   (Shao et al. 2024, eq. 3 / sec. 4.1.2)
    `scale_by_std=False` leaves out the division (Dr. GRPO, Liu et al. 2025: the std favours prompts that
    are too easy or too hard). std is the unbiased sample standard deviation of the group.
    """
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int, tol: float = 0.0) -> torch.Tensor:
    """(B // group_size,) bool: groups whose rewards are not all equal (within `tol`).

    DAPO's dynamic sampling (Yu et al. 2025, eq. 11) keeps only these: a group that scores alike has zero
    group-relative advantage everywhere and contributes no gradient, only noise in the loss normaliser.
    """
    groups = _groups(rewards, group_size)
    return (groups.max(1).values - groups.min(1).values) > tol


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a reward added per sequence.

    lengths: (B,) response lengths in tokens. With L = max_length and a buffer of `cache` tokens:
        0                          if len <= L - cache
        ((L - cache) - len) / cache   if L - cache < len <= L
        -1                         if len > L
    """
    if not 0 < cache <= max_length:
        raise ValueError(f"overlong cache must be in (0, max_length={max_length}], got {cache}")
    lengths = lengths.to(torch.float32)
    start = max_length - cache
    penalty = torch.clamp((start - lengths) / cache, max=0.0)
    return torch.where(lengths > max_length, torch.full_like(penalty, -1.0), penalty)


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio, log s_i = (1/|y_i|) sum_t (log pi - log pi_old)
    (Zheng et al. 2025, eq. 7). (B, T) -> (B,)."""
    mask = mask.to(logp.dtype)
    return ((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element PPO surrogate loss with asymmetric clipping, and whether the clipped branch was taken.

        L = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)

    DAPO's clip-higher (Yu et al. 2025, eq. 10) lets low-probability tokens rise further (clip_high >
    clip_low); equal values give Schulman et al. 2017's L^CLIP. Works per token (B, T) or per sequence (B,).
    """
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: LossAggregation, max_tokens: int) -> torch.Tensor:
    """A scalar loss from a (B, T) per-token loss.

    token_mean: sum over every response token / number of response tokens (DAPO: long answers weigh by
        their length);
    sequence_mean: mean over sequences of each sequence's token mean (GRPO, Shao et al. 2024, eq. 3);
    constant: sum over response tokens / (B * max_tokens) (Dr. GRPO: no length bias from the normaliser).
    """
    mask = mask.to(per_token.dtype)
    total = per_token * mask
    if how == "token_mean":
        return total.sum() / mask.sum().clamp(min=1.0)
    if how == "sequence_mean":
        return (total.sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    if how == "constant":
        return total.sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(f"loss aggregation {how!r}: expected token_mean, sequence_mean or constant")


def kl_k3_loss_term(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) with gradient through logp: exp(ref - logp) - (ref - logp) - 1
    (Schulman 2020; the KL term of GRPO's loss, Shao et al. 2024, eq. 4). (B, T) -> (B, T), >= 0."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r
