"""Token log-probabilities and entropies from hidden states, one chunk of tokens at a time.

A causal LM's logits are `head(hidden)` (soft-capped in Gemma 2 and RecurrentGemma). At Gemma's
vocabulary of 262144 one fp32 row of logits is 1 MiB, so `[batch, seq, vocab]` logits of a modest RL
batch take gigabytes, three times over once log-softmax and its gradient exist. Here the head runs on
`chunk_tokens` positions at a time: each chunk's logits give the chosen token's logit and a logsumexp
(and an entropy), then are dropped.

    log p(y) = z_y - logsumexp(z),  z = softcap(head(h)) / T
    H(p)     = logsumexp(z) - sum_v softmax(z)_v z_v

A plain linear head (every lean family's) goes through one autograd function: its forward keeps only the
logsumexp per token; its backward recomputes each chunk's logits once and turns them into the logits'
gradient in place,

    d log p(y) / d z = onehot(y) - softmax(z),   d z / d logits = (1 - tanh^2(logits / cap)) / T,

then into the gradients of the hidden states and the head (two matrix products). Entropy and raw logprobs
are diagnostics: computed in the forward pass, no gradient. Any other head (the full-logits fallback's
identity, a LoRA-wrapped or ZeRO-3-partitioned head) is differentiated by autograd with each chunk
recomputed in the backward pass (activation checkpointing), so no more than a chunk's logits and their
gradient exist at once. The exception is a frozen ZeRO-3 partition (LoRA under ZeRO-3): its chunks keep
their logits for the backward rather than gathering the weight again (response tokens only). The linear
head reuses its two chunk-sized buffers from chunk to chunk (on CPU, allocating 64 MiB afresh costs as
much as filling it: page faults).

The selective log-softmax (gather the label's logit, subtract a per-row logsumexp) is the trick TRL's
`selective_log_softmax` and OpenRLHF's `log_probs_from_logits` use to avoid a full log-softmax; the
chunking over tokens with recomputation follows the "cut cross-entropy" / Liger fused-linear
cross-entropy idea (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models").
All arithmetic after the head is fp32, whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Logits held at once: 64 MiB of fp32 (64 tokens at vocabulary 262144, 32768 tokens at 512)."""


def chunk_tokens_for(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk of fp32 logits takes about `chunk_bytes`."""
    return max(16, chunk_bytes // (4 * vocab_size))


def softcap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """cap * tanh(logits / cap): Gemma 2's final-logit soft-capping (Gemma Team 2024, section 2); identity
    when `cap` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _chunk_stats(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable,
    cap: Optional[float],
    temperature: float,
    with_entropy: bool,
    with_raw: bool,
) -> tuple[torch.Tensor, ...]:
    """(logp, entropy?, raw logp?) of one chunk: hidden (n, H), labels (n,) -> each (n,), fp32."""
    raw = softcap(head(hidden).float(), cap)
    picked = raw.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    z = raw / temperature if temperature != 1.0 else raw
    lse = torch.logsumexp(z, dim=-1)
    out = [(picked / temperature if temperature != 1.0 else picked) - lse]
    if with_entropy:
        out.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
    if with_raw:
        out.append(out[0] if z is raw else picked - torch.logsumexp(raw, dim=-1))
    return tuple(out)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable,
    *,
    cap: Optional[float] = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_raw: bool = False,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, ...]:
    """log softmax(softcap(head(hidden)) / T)[labels] for N token positions, `chunk_tokens` at a time.

    hidden: (N, H) hidden states whose next token is `labels` (N,). Returns a tuple: logp (N,), then the
    entropy of the tempered distribution (N,) if `with_entropy`, then the raw (T=1) logp (N,) if
    `with_raw` — all fp32. logp is differentiable with respect to `hidden` and the head's parameters, and no
    more than one chunk of logits is held in the backward pass; the entropy and the raw logp carry no
    gradient for a plain linear head.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n_out = 1 + with_entropy + with_raw
    if hidden.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return tuple(empty for _ in range(n_out))
    if plain_linear(head):
        device = hidden.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
        return _LinearHeadLogprobs.apply(
            hidden, head.weight, head.bias, labels, cap, temperature, with_entropy, with_raw, chunk_tokens, mm_dtype
        )
    params = list(getattr(head, "parameters", lambda: [])())
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    # A frozen head whose weight DeepSpeed ZeRO-3 has partitioned (LoRA under ZeRO-3) is not gathered again
    # for a recomputation in the backward pass: its chunks keep their logits for the backward instead
    # (response tokens only, still no [batch, seq, vocab] tensor). Trained heads are recomputed as usual.
    recompute = grad and not any(hasattr(p, "ds_id") and not p.requires_grad for p in params)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (
            hidden[start : start + chunk_tokens],
            labels[start : start + chunk_tokens],
            head,
            cap,
            temperature,
            with_entropy,
            with_raw,
        )
        parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False) if recompute else _chunk_stats(*args))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(n_out))


@dataclass(frozen=True)
class LinearHead:
    """A linear head given by its weight and bias as one graph sees them (rollout's late-gradient view of
    a weight tied to the input embedding), scored like a `torch.nn.Linear`."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


def plain_linear(head) -> bool:
    """A `torch.nn.Linear` (or `LinearHead`) whose weight is all here (not a ZeRO-3 partition, which only
    the module's own forward hooks gather)."""
    return type(head) in (torch.nn.Linear, LinearHead) and not hasattr(head.weight, "ds_id")


def _head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor
) -> torch.Tensor:
    """fp32 logits of one chunk written into `out` (rows x vocab, reused from chunk to chunk: at a large
    vocabulary allocating it afresh costs as much as filling it), the product in `weight`'s dtype (what
    autocast would use)."""
    h = hidden.to(weight.dtype)
    if weight.dtype == torch.float32:
        torch.mm(h, weight.t(), out=out)
    else:
        out.copy_(h @ weight.t())
    return out if bias is None else out.add_(bias)


def _log_normaliser(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of z (left unchanged), using `scratch` (same shape) for exp."""
    peak = z.amax(-1, keepdim=True)
    torch.sub(z, peak, out=scratch).exp_()
    return (peak + scratch.sum(-1, keepdim=True).log()).squeeze(-1)


class _LinearHeadLogprobs(torch.autograd.Function):
    """Chunked logprobs through a linear head with a hand-written backward (module docstring). Two
    rows x vocab fp32 buffers are reused across chunks, and every elementwise step is in place."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, cap, temperature, with_entropy, with_raw, chunk_tokens, mm_dtype):
        w, b = weight.to(mm_dtype), None if bias is None else bias.to(mm_dtype)
        n, rows_per_chunk = hidden.shape[0], min(chunk_tokens, hidden.shape[0])
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else None
        raw = torch.empty_like(logp) if with_raw and temperature != 1.0 else None
        buf = torch.empty(rows_per_chunk, weight.shape[0], dtype=torch.float32, device=hidden.device)
        scratch = torch.empty_like(buf) if entropy is not None or raw is not None else None
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            m = min(chunk_tokens, n - start)
            z = _head_logits(hidden[rows], w, b, buf[:m])
            if cap is not None:
                z.div_(cap).tanh_().mul_(cap)
            picked = z.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1)
            if raw is not None:
                raw[rows] = picked - _log_normaliser(z, scratch[:m])
            if temperature != 1.0:
                z.div_(temperature)
                picked = picked / temperature
            peak = z.amax(-1, keepdim=True)
            u = z.sub_(peak)  # z - max: log p up to the normaliser
            if entropy is None:
                log_sum = u.exp_().sum(-1).log()
            else:  # H = log s - sum_v e_v u_v / s, with e = exp(u), s = sum_v e_v
                e = torch.exp(u, out=scratch[:m])
                sum_e = e.sum(-1)
                log_sum = sum_e.log()
                entropy[rows] = log_sum - e.mul_(u).sum(-1) / sum_e
            lse[rows] = peak.squeeze(-1) + log_sum
            logp[rows] = picked - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.settings = (cap, temperature, chunk_tokens, mm_dtype)
        out = [logp]
        if with_entropy:
            out.append(entropy)
        if with_raw:
            out.append(raw if raw is not None else logp.clone())
        ctx.mark_non_differentiable(*out[1:])
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        cap, temperature, chunk_tokens, mm_dtype = ctx.settings
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        if grad_logp is None or not (want_h or want_w or want_b):
            return (None,) * 10
        w, b = weight.to(mm_dtype), None if bias is None else bias.to(mm_dtype)
        w_fp32 = weight.float()
        n, rows_per_chunk = hidden.shape[0], min(chunk_tokens, hidden.shape[0])
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        buf = torch.empty(rows_per_chunk, weight.shape[0], dtype=torch.float32, device=hidden.device)
        grad_buf = torch.empty_like(buf) if cap is not None or temperature != 1.0 else None
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            m = min(chunk_tokens, n - start)
            g_out = grad_logp[rows].float().unsqueeze(-1)
            logits = _head_logits(hidden[rows], w, b, buf[:m])
            tanh = logits.div_(cap).tanh_() if cap is not None else None
            if tanh is not None:
                grad = torch.mul(tanh, cap / temperature, out=grad_buf[:m])
            elif temperature != 1.0:
                grad = torch.div(logits, temperature, out=grad_buf[:m])
            else:
                grad = logits
            grad.sub_(lse[rows].unsqueeze(-1)).exp_().mul_(-g_out)  # -g * softmax(z)
            grad.scatter_add_(-1, labels[rows].unsqueeze(-1), g_out)  # + g at the label
            if temperature != 1.0:
                grad.div_(temperature)
            if tanh is not None:
                grad.mul_(tanh.mul_(tanh).neg_().add_(1))
            if want_h:
                torch.mm(grad, w_fp32, out=grad_h[rows])
            if want_w:
                grad_w.addmm_(grad.t(), hidden[rows].float())
            if want_b:
                grad_b.add_(grad.sum(0))
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
