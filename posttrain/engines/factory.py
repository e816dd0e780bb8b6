"""The one place engines are made, and how several ranks share the work of generating.

`make_engine` builds the backend a stage's `sampling.backend` names, on the stage's device and in its
precision: HF generate over a model in memory (or loaded from the directory), or a vLLM engine in this
process. Under N torchrun ranks the vLLM engines are colocated with the ranks (external launcher), in
groups of `tensor_parallel_size`. It never falls back from one backend to the other.

Two ways to generate under ranks:
- `generate_all`: a fixed prompt list every rank holds (synth, prefs, eval). Each engine group samples
  its consecutive share, and every rank gets all the samples back.
- `generate_own`: each rank's own prompts (RL: each rank trains on its samples). The ranks of a group pool
  their prompts, the group samples them together, and each rank gets its own back.
Seeds follow a prompt's position in the whole list, so the samples do not depend on how many groups
shared the work (vLLM; HF seeds once per call).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..dist.rank import DTYPE_NAMES, all_gather_objects, shard_bounds, torch_dtype, world
from ..models import load_model, load_tokenizer
from .base import Sample, SamplingConfig, VLLMOptions
from .hf import HFEngine

GENERATION_MEMORY_SHARE = 0.9
"""gpu_memory_utilization of an engine that has the GPU to itself (a generating stage)."""
COLOCATED_MEMORY_SHARE = 0.35
"""... and of one that shares the GPU with training (ppo): the rest is the trainer's."""


def make_engine(
    model_dir: str,
    sampling: SamplingConfig,
    device: torch.device,
    precision: str = "fp32",
    *,
    vllm: Optional[VLLMOptions] = None,
    model=None,
    tokenizer=None,
    seed: int = 0,
    shares_gpu_with_training: bool = False,
):
    """The generation engine `sampling.backend` names, over the model in `model_dir`.

    hf: `model`/`tokenizer` when given (e.g. the policy being trained; it stays where it is), else the
    directory's model loaded on `device` in the precision's dtype.
    vllm: an in-process engine (`vllm` options) in the precision's dtype; under N ranks colocated in
    groups of `sampling.tensor_parallel_size`. `model` is not used: push weights with `load_weights`.
    `seed`: the engine's base seed; each tensor-parallel group gets its own (all ranks of a group the same).
    """
    if sampling.backend == "hf":
        if vllm is not None and vllm.model_dump(exclude_defaults=True):
            raise ValueError(
                f"backend 'hf' takes no vLLM options, got {sorted(vllm.model_dump(exclude_defaults=True))}"
            )
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        if model is None:
            model = load_model(model_dir, device=device, dtype=torch_dtype(precision)).eval()
        return HFEngine(model, tokenizer, precision)
    if sampling.backend == "vllm":
        from .vllm import VLLMEngine

        opts = (vllm or VLLMOptions()).model_dump()
        share = sampling.gpu_memory_utilization or (
            COLOCATED_MEMORY_SHARE if shares_gpu_with_training else GENERATION_MEMORY_SHARE
        )
        sleep = opts.pop("enable_sleep_mode")
        group = world()[0] // sampling.tensor_parallel_size
        return VLLMEngine(
            model_dir,
            tokenizer=tokenizer,
            tensor_parallel_size=sampling.tensor_parallel_size,
            gpu_memory_utilization=share,
            dtype=DTYPE_NAMES[precision],
            seed=seed + group,
            enable_sleep_mode=shares_gpu_with_training if sleep is None else sleep,
            **{k: v for k, v in opts.items() if v is not None},
        )
    raise ValueError(f"sampling backend {sampling.backend!r}: expected 'hf' or 'vllm'")


def generate_all(engine, prompts: list, sampling: SamplingConfig) -> list[list[Sample]]:
    """Samples of every prompt on every rank; each engine group generates its consecutive share."""
    group, groups, index_in_group = getattr(engine, "group", (0, 1, 0))  # test fakes: one group
    if groups == 1:
        return engine.generate(prompts, sampling)
    start, end = shard_bounds(len(prompts), groups, group)
    mine = engine.generate(prompts[start:end], sampling, first_index=start)
    shares = all_gather_objects(mine if index_in_group == 0 else None)
    out = [samples for share in shares if share is not None for samples in share]
    if len(out) != len(prompts):
        raise RuntimeError(f"generate_all: {len(out)} sample lists came back for {len(prompts)} prompts")
    return out


def generate_own(engine, prompts: list, sampling: SamplingConfig) -> list[list[Sample]]:
    """Samples of this rank's own prompts; the ranks of an engine group pool theirs and generate together."""
    group, groups, index_in_group = getattr(engine, "group", (0, 1, 0))
    size = world()[1] // groups
    if size == 1 and groups == 1:
        return engine.generate(prompts, sampling)
    # One collective: the prompts themselves when the group pools them, else only their counts.
    everyone = all_gather_objects(prompts) if size > 1 else None
    counts = [len(p) for p in everyone] if everyone is not None else all_gather_objects(len(prompts))
    first_rank = group * size
    pooled = [p for r in range(first_rank, first_rank + size) for p in everyone[r]] if size > 1 else prompts
    out = engine.generate(pooled, sampling, first_index=sum(counts[:first_rank]))
    offset = sum(counts[first_rank : first_rank + index_in_group])
    return out[offset : offset + len(prompts)]
