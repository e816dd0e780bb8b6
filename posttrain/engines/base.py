"""What every generation engine shares: the sampling settings, the typed vLLM options, a sample, and the
chat rendering of prompts.

An engine has `generate(prompts, sampling) -> list[list[Sample]]` (n samples per prompt), `load_weights`
(push new weights; the HF engine samples from the live model and needs none), `sleep`/`wake` (free and
restore accelerator memory between generations; no-ops where unsupported) and `close`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from pydantic import Field

from ..chat import chat_prompt_ids  # noqa: F401  (re-exported: engines render prompts with it)
from ..config import Section


class SamplingConfig(Section):
    """How to sample."""

    backend: Literal["hf", "vllm"] = "hf"
    """Generation backend: Hugging Face generate, or a vLLM engine in this process (colocated per rank)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature; 0 = greedy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest completion, in tokens."""
    n: int = Field(1, ge=1)
    """Samples per prompt."""
    batch_size: int = Field(64, ge=1)
    """Prompts per forward batch (HF backend)."""
    seed: Optional[int] = None
    """Sampling seed (None: nondeterministic)."""
    logprobs: bool = False
    """HF backend: also report each sampled token's raw logprob (keeps every step's full-vocabulary logits,
    batch x steps x vocab floats; vLLM always reports them at no cost)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM: ranks (GPUs) one engine shards the model over; under N ranks it must divide N."""
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)
    """vLLM: share of GPU memory the engine may take; None: 0.9 for a generating stage, 0.35 when the
    engine shares the GPU with training (ppo)."""


class VLLMOptions(Section):
    """vLLM engine settings beyond sampling (unknown keys are refused)."""

    kv_cache_gib: Optional[float] = Field(None, gt=0)
    """KV cache size in GiB (CPU: VLLM_CPU_KVCACHE_SPACE, default 1; GPU: overrides gpu_memory_utilization for it)."""
    max_model_len: Optional[int] = Field(None, ge=16)
    """Longest prompt + completion the engine schedules (default: the model's context length)."""
    enforce_eager: Optional[bool] = None
    """Run without CUDA graphs / compilation (None: eager on CPU, compiled on GPU)."""
    enable_sleep_mode: Optional[bool] = None
    """Free the KV cache and offload weights while training (None: on for ppo on GPUs; a no-op on CPU)."""
    max_num_seqs: Optional[int] = Field(None, ge=1)
    """Most sequences scheduled at once."""
    max_num_batched_tokens: Optional[int] = Field(None, ge=1)
    """Token budget of one scheduler step (CPU default 65536: keeps per-request seeds working)."""
    enable_prefix_caching: Optional[bool] = None
    """Reuse KV of shared prompt prefixes (vLLM's default when None)."""


@dataclass
class Sample:
    """One completion of one prompt."""

    text: str
    """The completion decoded without special tokens."""
    token_ids: list[int]
    """Completion tokens, including the stop token if one was produced."""
    logprobs: list[float] = field(default_factory=list)
    """Log-probability of each completion token under the raw (T=1) logits; empty when not asked for."""
    finished: bool = False
    """True if the completion ended with a stop token (end of turn or eos)."""
