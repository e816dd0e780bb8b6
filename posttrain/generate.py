"""Batched sampling from a causal LM: chat prompts in, n samples each out, with token ids and logprobs.

One interface, `Engine.generate(prompts, sampling)`, with backends behind it: Hugging Face `generate`
(here) and vLLM (generate_vllm.py). Every backend stops on `<end_of_turn>` as well as `<eos>`, and
reports for each sample whether it ended its turn (a missing end of turn is a truncated answer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from pydantic import Field

from .config import Section
from .models import stop_token_ids


class SamplingConfig(Section):
    """How to sample."""

    backend: Literal["hf", "vllm"] = "hf"
    """Generation backend: Hugging Face generate, or an in-process vLLM engine."""
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
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM: GPUs one engine shards the model over (tensor parallel)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vLLM: share of GPU memory the engine may take (the trainer needs the rest when colocated)."""


@dataclass
class Sample:
    """One completion of one prompt."""

    text: str
    """The completion decoded without special tokens."""
    token_ids: list[int]
    """Completion tokens, including the stop token if one was produced."""
    logprobs: list[float] = field(default_factory=list)
    """Log-probability of each completion token under the sampling distribution's logits (raw, T=1)."""
    finished: bool = False
    """True if the completion ended with a stop token (end of turn or eos)."""


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the generation prompt (`<start_of_turn>model\\n`)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


class HFEngine:
    """Hugging Face `generate` backend over a model already in memory."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = stop_token_ids(tokenizer)

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], sampling: SamplingConfig) -> list[list[Sample]]:
        """For each prompt (a message list), `sampling.n` samples."""
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        was_training = self.model.training
        self.model.eval()
        results: list[list[Sample]] = []
        try:
            for start in range(0, len(prompts), sampling.batch_size):
                batch = [chat_prompt_ids(self.tokenizer, p) for p in prompts[start:start + sampling.batch_size]]
                results += self._generate_batch(batch, sampling)
        finally:
            self.model.train(was_training)
        return results

    def _generate_batch(self, batch: list[list[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        device = next(self.model.parameters()).device
        greedy = sampling.temperature == 0
        out = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device),
            max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
            top_k=None, num_return_sequences=sampling.n, eos_token_id=self.stop_ids, pad_token_id=pad,
            output_logits=True, return_dict_in_generate=True,
        )
        new = out.sequences[:, width:].cpu()
        logps = torch.stack(out.logits, dim=1).float().log_softmax(-1).cpu()
        token_logps = logps.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), None)
            ids = ids[:end] if end else ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            samples.append(Sample(text=text, token_ids=ids, logprobs=token_logps[row, :len(ids)].tolist(),
                                  finished=end is not None))
        return [samples[i * sampling.n:(i + 1) * sampling.n] for i in range(len(batch))]


def greedy_texts(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """One greedy completion per prompt (a message list) from a model in memory: held-out checks."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    return [s[0].text for s in HFEngine(model, tokenizer).generate(prompts, sampling)]


def make_engine(model_dir: str, sampling_backend: str, model=None, tokenizer=None, **vllm_options):
    """The generation engine for `sampling_backend` ("hf" or "vllm") over the model in `model_dir`.

    hf: `model`/`tokenizer` when given (e.g. the policy being trained), else loaded from `model_dir`.
    vllm: an in-process `VLLMEngine(model_dir, tokenizer, **vllm_options)`; `model` is not used (push
    new weights with `engine.load_weights`). Never falls back from one backend to the other.
    """
    from .models import load_model, load_tokenizer

    if sampling_backend == "hf":
        if vllm_options:
            raise ValueError(f"backend 'hf' takes no vLLM options, got {sorted(vllm_options)}")
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        return HFEngine(model if model is not None else load_model(model_dir), tokenizer)
    if sampling_backend == "vllm":
        from .generate_vllm import VLLMEngine

        return VLLMEngine(model_dir, tokenizer=tokenizer, **vllm_options)
    raise ValueError(f"sampling backend {sampling_backend!r}: expected 'hf' or 'vllm'")
