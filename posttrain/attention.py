"""Gemma 2's eager attention with grouped queries kept grouped, registered with transformers.

Gemma 2 runs eager attention here: transformers' SDPA path drops its attention logit soft-capping
(`models.attention_implementation`). transformers' eager attention copies every key/value head once per query
head that reads it (`repeat_kv`) before two batched matmuls. This one computes the same thing (the
multi-query/grouped-query attention of Ainslie et al. 2023, "GQA", with Gemma 2's soft-cap) by viewing the
queries of a group as extra rows of their key/value head, so keys and values are read in place: no copies per
step of decoding, and autograd keeps the keys and values once instead of once per query head. Same operations
in the same order otherwise (scale, soft-cap, additive mask, fp32 softmax, dropout); equal to eager to fp32
rounding (`tests/test_attention.py`). The implementation name is a process-local registration: it is not
written to a saved config.json, so saved models load anywhere with the attention their reader picks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

GROUPED_EAGER = "posttrain_grouped_eager"
"""The name models are built and loaded with (`attn_implementation`)."""


def grouped_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    softcap: Optional[float] = None,
    **_,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: `query` (batch, heads, q, dim), `key`/`value` (batch,
    kv_heads, kv, dim), `attention_mask` additive (batch, 1, q, kv) or None; returns (batch, q, heads, dim)
    and no attention weights. Query head h reads key/value head h // (heads / kv_heads), as `repeat_kv` lays
    them out."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    scores = torch.matmul(query.reshape(batch, kv_heads, group * q_len, dim), key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, group, q_len, kv_len)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, :kv_len]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.view(batch, kv_heads, group * q_len, kv_len), value)
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention function and eager's additive mask under `GROUPED_EAGER` (idempotent; a name
    without a registered mask would get no mask at all from transformers) and return the name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    AttentionMaskInterface.register(GROUPED_EAGER, eager_mask)
    return GROUPED_EAGER
