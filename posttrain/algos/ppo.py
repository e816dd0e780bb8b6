"""Per-token PPO for language models.

Small pure functions on torch tensors. Conventions shared by every function:

* ``(B, T)`` tensors are indexed by (batch row, token position).
* ``mask`` is a 0/1 float or bool tensor of shape ``(B, T)`` that marks the
  response tokens. It is assumed to be one contiguous span per row (prompt and
  padding are 0); the last 1 of a row is the end-of-turn token.
* Log-probabilities are those of the sampled tokens, shape ``(B, T)``.

References
----------
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation" (GAE).
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (PPO).
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
- Ouyang et al. 2022, "Training language models to follow instructions with
  human feedback" (InstructGPT).
- Schulman 2020, "Approximating KL Divergence" (blog post, k1/k2/k3).
- Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".
- Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy
  RL Training"; Espeholt et al. 2018, "IMPALA" (truncated importance weights).
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    x, mask: (B, T). With ``dim=None`` returns a scalar; otherwise reduces
    ``dim`` (e.g. ``dim=1`` gives a per-row mean of shape (B,)). Rows with no
    valid entry give 0 rather than NaN.
    """
    mask = mask.to(x.dtype)
    total = (x * mask).sum(dim=dim) if dim is not None else (x * mask).sum()
    count = mask.sum(dim=dim) if dim is not None else mask.sum()
    return total / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask`` is 1 (scalar).

    x, mask: (B, T). ``unbiased=True`` applies Bessel's correction n/(n-1),
    matching ``torch.var`` on the selected entries.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1.0)  # no host sync; n<2 degrades to biased
    return var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise ``x`` to mean 0 / std 1 using statistics of valid tokens only.

    x, mask: (B, T) -> (B, T). Padding entries do not influence the statistics
    and are returned as 0. With ``shift_mean=False`` the mean is added back
    (only the scale is normalised), as done for advantages in some codebases.
    ``moments``: (mean, var) computed elsewhere, e.g. over every rank's batch.
    Advantage whitening: Huang et al. 2024, detail "advantage whitening".
    """
    mask = mask.to(x.dtype)
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------------------
# Per-token KL estimators (Schulman 2020, "Approximating KL Divergence")
# Samples come from the policy p; estimates of KL(p || ref) per token.
# ---------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log ref: unbiased, high variance, can be negative. (B, T) -> (B, T)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (log p - log ref)^2: biased, low variance, >= 0. (B, T) -> (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = ref/p: unbiased, low variance, >= 0. (B, T) -> (B, T)."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


# ---------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row. mask: (B, T) -> (B,) long.

    Rows without any valid token return -1.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def token_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    score_clip: float | None = None,
) -> torch.Tensor:
    """Per-token RLHF reward: KL penalty on every token, sequence score at the end.

    score: (B,) reward-model score of each sequence.
    kl: (B, T) per-token KL estimate (e.g. ``kl_k1(logp, ref_logp)``).
    mask: (B, T) response tokens.
    kl_coef: scalar beta; ``score_clip`` optionally clamps scores to [-c, c].
    Returns (B, T): r_t = -beta * kl_t on response tokens, plus ``score`` added
    at the last valid token (the end-of-turn token); 0 elsewhere.
    Ziegler et al. 2019 eq. 2 / Ouyang et al. 2022 eq. 2, per-token form as in
    Huang et al. 2024 ("reward = score at EOS, minus per-token KL").
    """
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    if score_clip is not None:
        score = score.clamp(-score_clip, score_clip)
    last = last_token_index(mask)
    rows = torch.nonzero(last >= 0, as_tuple=True)[0]
    rewards = rewards.clone()
    rewards[rows, last[rows]] += score[rows].to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation, computed backwards along each row.

    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T),
    zero outside ``mask``. Positions after the last valid token are terminal:
    V = 0 there and no advantage flows back from them.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    Schulman et al. 2016, eq. 11-16 (GAE(gamma, lambda)); returns as the
    lambda-return target for the value function.
    """
    mask = mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        # mask[:, t + 1] == 0 means t is the last token: bootstrap from 0.
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        next_adv = delta + gamma * lam * next_adv * next_mask
        advantages[:, t] = next_adv
        next_value = values[:, t]
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages of sequences sampled ``group_size`` at a time per prompt.

    rewards: (B,) with the samples of one prompt in consecutive rows (B = prompts * group_size).
    Returns (B,): each sample's reward minus the mean reward of the other samples of its prompt,

        A_i = r_i - 1/(k-1) * sum_{j != i} r_j = k/(k-1) * (r_i - mean_j r_j)

    so a prompt whose samples all score alike teaches nothing (A = 0), whatever a value model would say.
    Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024,
    "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback" (RLOO).
    """
    if group_size < 2:
        raise ValueError("rloo needs at least 2 samples per prompt (sampling.n >= 2)")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    others_mean = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).view(-1)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def policy_loss_clipped(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss, averaged over valid tokens.

    logp: (B, T) current log-probs of the sampled tokens (with grad).
    old_logp: (B, T) log-probs under the policy that sampled (no grad).
    advantages: (B, T); mask: (B, T).
    is_weight: optional (B, T) per-token importance weight that multiplies the
        per-token loss (e.g. ``truncated_is_weight`` for engine/trainer mismatch).
    Returns (loss, clip_fraction, approx_kl), all scalars; the last two are
    detached diagnostics. approx_kl is the k3 estimate of KL(old || new).

        ratio = exp(logp - old_logp)
        L = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)

    Schulman et al. 2017, eq. 7 (L^CLIP), negated to be minimised.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    if is_weight is not None:
        per_token = per_token * is_weight
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clip_fraction = masked_mean((loss_clipped > loss_unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss_clipped(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, averaged over valid tokens.

    values: (B, T) current value predictions (with grad); old_values: (B, T)
    predictions at rollout time; returns: (B, T) targets; mask: (B, T).
    Returns (loss, clip_fraction), scalars; clip_fraction is detached.

        V_clip = old_V + clip(V - old_V, -eps, eps)
        L = 0.5 * max((V - R)^2, (V_clip - R)^2)

    Value clipping as in the OpenAI baselines PPO2 / Ziegler et al. 2019 code,
    described in Huang et al. 2024 ("value function loss clipping").
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, clip_fraction


def truncated_is_weight(trainer_old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight correcting rollout-engine / trainer mismatch.

    trainer_old_logp: (B, T) log-probs of the sampled tokens recomputed by the
    trainer with the rollout-time weights; engine_logp: (B, T) log-probs
    reported by the inference engine that sampled them. Returns (B, T),
    detached: w = min(pi_trainer / pi_engine, cap).
    Yao et al. 2025 (truncated importance sampling, TIS); Espeholt et al. 2018
    (IMPALA, truncated importance weights, eq. 1 rho-bar).
    """
    with torch.no_grad():
        return torch.clamp(torch.exp(trainer_old_logp - engine_logp), max=cap)


# ---------------------------------------------------------------------------
# Logit utilities
# ---------------------------------------------------------------------------


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution. logits: (..., V) -> (...).

    H = -sum_v p_v log p_v with p = softmax(logits); tokens with p_v = 0
    (e.g. logits of -inf for masked vocabulary) contribute 0, without NaN.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    return -(p * logp).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] without materialising the full log-softmax.

    logits: (B, T, V); labels: (B, T) long. Returns (B, T) in ``logits.dtype``.
    For float32/float64 uses gather(z) - logsumexp(z); for low-precision
    dtypes (bf16/fp16), where logsumexp loses accuracy, computes log_softmax
    one row at a time to keep peak memory at one row's worth.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row_logp = torch.log_softmax(row_logits.float(), dim=-1)
        rows.append(torch.gather(row_logp, -1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows).to(logits.dtype)


# ---------------------------------------------------------------------------
# KL coefficient controllers (stateful, hence classes)
# ---------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient beta. ``update`` is a no-op."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards ``target``.

        e_t = clip(KL_t / target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)

    Ziegler et al. 2019, section 2.2 (K_beta = n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
