"""Weight-merging formulas, applied tensor by tensor.

Every function takes and returns plain tensors (one parameter tensor of each
model); a caller loops over the state dict. Arithmetic is done in float32
(float64 if the inputs are float64) and the result is cast back to the dtype
of the first input, so bf16 checkpoints stay bf16.

References
----------
- Wortsman et al. 2022, "Model soups" (uniform / weighted averaging).
- Ilharco et al. 2023, "Editing Models with Task Arithmetic" (task vectors).
- Shoemake 1985, "Animating rotation with quaternion curves" (SLERP).
- Ramé et al. 2024, "WARP: On the Benefits of Weight Averaged Rewarded
  Policies", arXiv 2406.16768 (EMA anchor, SLERP of task vectors, LITI).
- Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
  Models".
- Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch" (DARE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_same_shape(tensors: Sequence[torch.Tensor]) -> None:
    if len(tensors) == 0:
        raise ValueError("need at least one tensor")
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"shape mismatch: {tuple(t.shape)} vs {tuple(shape)}")


def _as_weights(weights: float | Sequence[float], n: int) -> list[float]:
    if isinstance(weights, (int, float)):
        return [float(weights)] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} tensors")
    return weights


def linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = True,
    allow_negative: bool = False,
) -> torch.Tensor:
    """Weighted average sum_i w_i theta_i of same-shape tensors.

    tensors: n tensors of identical shape; weights: n floats.
    ``normalize=True`` divides the weights by their sum; otherwise they must
    already sum to 1. Raises ValueError on a length mismatch, on negative
    weights (unless ``allow_negative``), on a zero weight sum, or on weights
    not summing to 1 with ``normalize=False``.
    Wortsman et al. 2022, section 2 (uniform / weighted soup).
    """
    _check_same_shape(tensors)
    if isinstance(weights, (int, float)):
        raise ValueError("weights must be a sequence, one per tensor")
    w = _as_weights(weights, len(tensors))
    if not allow_negative and any(x < 0 for x in w):
        raise ValueError(f"negative weights {w} (pass allow_negative=True to permit)")
    total = sum(w)
    if normalize:
        if abs(total) < 1e-12:
            raise ValueError("weights sum to zero; cannot normalise")
        w = [x / total for x in w]
    elif abs(total - 1.0) > 1e-6:
        raise ValueError(f"weights sum to {total}, not 1 (use normalize=True)")
    dtype = _work_dtype(tensors[0])
    out = tensors[0].to(dtype) * w[0]
    for wi, t in zip(w[1:], tensors[1:]):
        out.add_(t.to(dtype), alpha=wi)  # in place: no full-size temporaries per input
    return out.to(tensors[0].dtype)


def ema_update(ema: torch.Tensor, new: torch.Tensor, mu: float) -> torch.Tensor:
    """One EMA step: (1 - mu) * ema + mu * new. Returns a new tensor.

    ema, new: same shape. ``mu`` is the update rate (weight of the *new*
    parameters), following WARP: theta_ema <- (1 - mu) theta_ema + mu theta,
    with mu = 0.01 in the paper (Ramé et al. 2024, section 3.1 / Algorithm 1).
    Note this is 1 - "decay" of the usual EMA parameterisation.
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must be in [0, 1], got {mu}")
    _check_same_shape([ema, new])
    dtype = _work_dtype(ema)
    return torch.lerp(ema.to(dtype), new.to(dtype), mu).to(ema.dtype)


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    eps: float = 1e-8,
    dot_threshold: float = 0.9995,
) -> torch.Tensor:
    """Spherical linear interpolation between two tensors, treated as vectors.

    a, b: same shape (flattened internally); t in [0, 1]; returns a's shape
    and dtype. With Omega the angle between a and b:

        slerp(a, b, t) = sin((1-t) Omega)/sin Omega * a + sin(t Omega)/sin Omega * b

    Falls back to linear interpolation (1-t) a + t b when either norm is below
    ``eps`` or the vectors are (anti-)parallel, |cos Omega| > ``dot_threshold``
    (sin Omega ~ 0 makes the formula ill-conditioned).
    Shoemake 1985; WARP (Ramé et al. 2024) eq. for SLERP, section 3.2.
    """
    _check_same_shape([a, b])
    dtype = _work_dtype(a)
    va, vb = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
    lerp = (1.0 - t) * va + t * vb
    norm_a, norm_b = va.norm(), vb.norm()
    if norm_a < eps or norm_b < eps:
        return lerp.reshape(a.shape).to(a.dtype)
    cos = torch.clamp(torch.dot(va, vb) / (norm_a * norm_b), -1.0, 1.0)
    if cos.abs() > dot_threshold:
        return lerp.reshape(a.shape).to(a.dtype)
    omega = torch.arccos(cos)
    sin_omega = torch.sin(omega)
    out = torch.sin((1.0 - t) * omega) / sin_omega * va + torch.sin(t * omega) / sin_omega * vb
    return out.reshape(a.shape).to(a.dtype)


def task_vector(theta: torch.Tensor, theta_init: torch.Tensor) -> torch.Tensor:
    """tau = theta - theta_init (same shape). Ilharco et al. 2023, section 2."""
    _check_same_shape([theta, theta_init])
    dtype = _work_dtype(theta)
    return (theta.to(dtype) - theta_init.to(dtype)).to(theta.dtype)


def task_arithmetic(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    weights: float | Sequence[float],
) -> torch.Tensor:
    """theta = base + sum_i lambda_i tau_i (same shape as base).

    weights: one lambda per task vector, or a single float used for all
    (the paper's single scaling coefficient). Ilharco et al. 2023, section 2.
    """
    _check_same_shape([base, *task_vectors])
    w = _as_weights(weights, len(task_vectors))
    dtype = _work_dtype(base)
    out = base.to(dtype)
    for wi, tau in zip(w, task_vectors):
        out = out + wi * tau.to(dtype)
    return out.to(base.dtype)


def slerp_task_vectors(init: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """WARP merge: init + slerp(a - init, b - init, t) (same shape as init).

    Interpolates the two task vectors on the sphere rather than the weights
    themselves. Ramé et al. 2024, section 3.2 (SLERP of task vectors).
    """
    _check_same_shape([init, a, b])
    dtype = _work_dtype(init)
    i = init.to(dtype)
    return (i + slerp(a.to(dtype) - i, b.to(dtype) - i, t)).to(init.dtype)


def liti(init: torch.Tensor, merged: torch.Tensor, eta: float) -> torch.Tensor:
    """Linear interpolation towards initialisation: init + eta (merged - init).

    eta = 1 keeps ``merged``, eta = 0 returns ``init``; sliding eta traces the
    KL-reward Pareto front. Ramé et al. 2024, section 3.3 (LITI).
    """
    _check_same_shape([init, merged])
    dtype = _work_dtype(init)
    return torch.lerp(init.to(dtype), merged.to(dtype), eta).to(init.dtype)


def _trim_topk(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * n) largest-magnitude entries of tau, zero the rest."""
    flat = tau.reshape(-1)
    k = int(round(density * flat.numel()))
    if k >= flat.numel():
        return tau.clone()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat.abs(), k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def ties(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    weights: float | Sequence[float],
    density: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES-merging of task vectors into ``base`` (same shape as base).

    1. Trim: keep the top-``density`` fraction of each tau_i by magnitude.
    2. Elect sign: gamma = sign(sum_i w_i trim(tau_i)) per entry.
    3. Disjoint merge: per entry, weighted mean over the tasks whose trimmed
       entry is non-zero with sign gamma: sum_{i in A} w_i tau_i / sum_{i in A} w_i.
    Result: base + scale * merged. With equal weights this is exactly the
    paper's disjoint mean; ``scale`` is the paper's lambda.
    Yadav et al. 2023, section 3 / Algorithm 1.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    _check_same_shape([base, *task_vectors])
    w = _as_weights(weights, len(task_vectors))
    dtype = _work_dtype(base)
    trimmed = torch.stack([_trim_topk(tau.to(dtype), density) for tau in task_vectors])
    w_t = torch.tensor(w, dtype=dtype).reshape(-1, *([1] * base.dim()))
    weighted = w_t * trimmed
    elected = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    num = (weighted * agree).sum(dim=0)
    den = (w_t * agree).sum(dim=0)
    merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    return (base.to(dtype) + scale * merged).to(base.dtype)


def dare(task_vector: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: Drop And REscale a task vector (same shape and dtype).

    Each entry is kept independently with probability ``density`` and the
    kept entries are divided by ``density``, so E[dare(tau)] = tau.
    Deterministic given ``generator`` (a CPU torch.Generator).
    Yu et al. 2024, section 3, eq. 1-2 (drop rate p = 1 - density).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density == 1.0:
        return task_vector.clone()
    dtype = _work_dtype(task_vector)
    u = torch.rand(task_vector.shape, generator=generator, dtype=torch.float32)
    keep = (u < density).to(task_vector.device)
    out = torch.where(keep, task_vector.to(dtype) / density, torch.zeros((), dtype=dtype))
    return out.to(task_vector.dtype)


def lora_merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """A LoRA-adapted linear layer folded into one weight: W + scaling * B @ A.

    weight: (out, in); lora_a: (r, in); lora_b: (out, r); scaling = alpha / r (or alpha / sqrt(r) for
    rsLoRA). Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3 and sec. 4.1
    (h = W0 x + (alpha / r) B A x, so W = W0 + (alpha / r) B A serves with no added latency).
    """
    dt = _work_dtype(weight)
    merged = weight.to(dt) + scaling * (lora_b.to(dt) @ lora_a.to(dt))
    return merged.to(weight.dtype)
