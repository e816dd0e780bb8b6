"""Token log-probabilities and entropies from hidden states, one chunk of tokens at a time.

A causal LM's logits are `head(hidden)` (soft-capped in Gemma 2 and RecurrentGemma). At Gemma's
vocabulary of 262144 one fp32 row of logits is 1 MiB, so `[batch, seq, vocab]` logits of a modest RL
batch take gigabytes, three times over once log-softmax and its gradient exist. Here the head runs on
`chunk_tokens` positions at a time: each chunk's logits give the chosen token's logit and a logsumexp
(and an entropy), then are dropped. Under autograd each chunk is recomputed in the backward pass
(activation checkpointing), so training holds one chunk of logits too.

    log p(y) = z_y - logsumexp(z),  z = softcap(head(h)) / T
    H(p)     = logsumexp(z) - sum_v softmax(z)_v z_v

The selective log-softmax (gather the label's logit, subtract a per-row logsumexp) is the trick TRL's
`selective_log_softmax` and OpenRLHF's `log_probs_from_logits` use to avoid a full log-softmax; the
chunking over tokens with recomputation follows the "cut cross-entropy" / Liger fused-linear
cross-entropy idea (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models").
All arithmetic after the head is fp32, whatever the model's dtype.
"""
from __future__ import annotations

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


def _chunk_stats(hidden: torch.Tensor, labels: torch.Tensor, head: Callable, cap: Optional[float],
                 temperature: float, with_entropy: bool, with_raw: bool) -> tuple[torch.Tensor, ...]:
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


def chunked_token_logprobs(hidden: torch.Tensor, labels: torch.Tensor, head: Callable, *,
                           cap: Optional[float] = None, temperature: float = 1.0, with_entropy: bool = False,
                           with_raw: bool = False, chunk_tokens: int = 1024) -> tuple[torch.Tensor, ...]:
    """log softmax(softcap(head(hidden)) / T)[labels] for N token positions, `chunk_tokens` at a time.

    hidden: (N, H) hidden states whose next token is `labels` (N,). Returns a tuple: logp (N,), then the
    entropy of the tempered distribution (N,) if `with_entropy`, then the raw (T=1) logp (N,) if
    `with_raw` — all fp32. Differentiable with respect to `hidden` and the head's parameters; under
    autograd each chunk's logits are recomputed in the backward pass instead of being kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n_out = 1 + with_entropy + with_raw
    if hidden.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return tuple(empty for _ in range(n_out))
    params = list(getattr(head, "parameters", lambda: [])())
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    # A frozen head whose weight DeepSpeed ZeRO-3 has partitioned (LoRA under ZeRO-3) is not gathered again
    # for a recomputation in the backward pass: its chunks keep their logits for the backward instead
    # (response tokens only, still no [batch, seq, vocab] tensor). Trained heads are recomputed as usual.
    recompute = grad and not any(hasattr(p, "ds_id") and not p.requires_grad for p in params)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens], head, cap, temperature,
                with_entropy, with_raw)
        parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False) if recompute else _chunk_stats(*args))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(n_out))
