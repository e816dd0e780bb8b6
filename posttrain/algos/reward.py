"""Reward-model losses and the implicit (likelihood) reward.

Shapes: per-token tensors are ``(B, T)`` with a 0/1 ``mask`` marking the answer tokens; rewards are ``(B,)``.

References
----------
- Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT), eq. 1: loss = −log σ(r(x, y_c) − r(x, y_r)).
- Touvron et al. 2023 (Llama 2), section 3.2.2: a margin m inside the sigmoid, −log σ(r_c − r_r − m).
- Eisenstein et al. 2023, "Helping or Herding?": the reward-centring penalty mean((r_c + r_r)²).
- Meng, Xia, Chen 2024, "SimPO", eq. 4: the reference-free implicit reward
  r(x, y) = β/|y| · log π(y|x), the length-normalised log-likelihood of the answer; eq. 6: the SimPO loss
  −log σ(r(x, y_w) − r(x, y_l) − γ), a Bradley-Terry loss with a fixed target reward margin γ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def implicit_reward(token_logp: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """SimPO's reward: β times the mean log-probability of the answer tokens (0 for an empty answer)."""
    mask = mask.to(token_logp.dtype)
    return beta * (token_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
) -> torch.Tensor:
    """Mean over pairs of −log σ(r_c − r_r − m), plus center_coef · mean((r_c + r_r)²) when set."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def simpo_loss(
    chosen_logp: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_logp: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6) from per-token logprobs: mean over pairs of
    −log σ(β/|y_w| · log π(y_w|x) − β/|y_l| · log π(y_l|x) − γ). No reference model."""
    return bradley_terry_loss(
        implicit_reward(chosen_logp, chosen_mask, beta),
        implicit_reward(rejected_logp, rejected_mask, beta),
        torch.tensor(gamma),
    )
