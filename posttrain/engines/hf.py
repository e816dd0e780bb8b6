"""Hugging Face `generate` backend over a model already in memory (any family, RecurrentGemma included).

It samples from the live model object, so a trainer that owns the model needs no weight push. Prompts
are left-padded into batches; generation stops on `<eos>` and `<end_of_turn>`.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from ..algos.ppo import logprobs_from_logits
from ..dist.rank import autocast, world
from ..lora import unwrap
from ..models import prompt_cache_supported, stop_token_ids
from .base import Sample, SamplingConfig, chat_prompt_ids


class HFEngine:
    """`generate(prompts, sampling)` with transformers' generate; `precision` autocasts an fp32 model."""

    def __init__(self, model, tokenizer, precision: str = "fp32"):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.stop_ids = stop_token_ids(tokenizer)
        rank, world_size = world()
        self.group = (rank, world_size, 0)
        """(group index, groups, index in group): under N ranks each rank is a group of its own."""

    @torch.inference_mode()  # no autograd bookkeeping at all: ~14% less CPU than no_grad on a 1M-parameter model
    def generate(self, prompts: list[list[dict]], sampling: SamplingConfig, first_index: int = 0) -> list[list[Sample]]:
        """For each prompt (a message list), `sampling.n` samples. (`first_index` is the vLLM engine's
        seed offset; HF seeds once per call.) Only Python lists leave this function: no inference-mode
        tensor reaches a later autograd pass."""
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed + first_index)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        mixed = autocast(device, self.precision) if _is_fp32(self.model) else contextlib.nullcontext()
        results: list[list[Sample]] = []
        try:
            with mixed:
                for start in range(0, len(prompts), sampling.batch_size):
                    batch = [chat_prompt_ids(self.tokenizer, p) for p in prompts[start : start + sampling.batch_size]]
                    results += self._generate_batch(batch, sampling, device)
        finally:
            self.model.train(was_training)
        return results

    def _generate_batch(self, batch: list[list[int]], sampling: SamplingConfig, device) -> list[list[Sample]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        greedy = sampling.temperature == 0
        copies, shared, first_logits, new_tokens = sampling.n, {}, None, sampling.max_new_tokens
        # Greedy copies would all be alike: generate refuses n > 1 there, and the cache is not shared.
        if copies > 1 and not greedy and prompt_cache_supported(unwrap(self.model), width + sampling.max_new_tokens):
            cache, first_logits = self._prompt_cache(input_ids, attention, copies)
            input_ids, attention = (t.repeat_interleave(copies, 0) for t in (input_ids, attention))
            first = _sample_first_token(first_logits, sampling)
            first_logits = first_logits if sampling.logprobs else None  # (rows, vocab): 32 MiB at 262k x 32
            copies, new_tokens = 1, new_tokens - 1  # the first token is drawn
            if new_tokens == 0:
                return self._samples(first[:, None], (first_logits,), sampling, len(batch))
            # generate continues from the first sampled token: the prompt is all in the cache. A row whose
            # first token ends its turn runs on unseen by generate; `_samples` cuts it at that token.
            input_ids = torch.cat([input_ids, first[:, None]], 1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
            shared = {"past_key_values": cache}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            num_return_sequences=copies,
            eos_token_id=self.stop_ids,
            pad_token_id=pad,
            output_logits=sampling.logprobs,
            return_dict_in_generate=True,
            **shared,
        )
        step_logits = ((first_logits,) if first_logits is not None else ()) + (out.logits or ())
        return self._samples(out.sequences[:, width:], step_logits, sampling, len(batch))

    def _samples(self, new: torch.Tensor, step_logits: tuple, sampling: SamplingConfig, prompts: int):
        """Per prompt, its `sampling.n` samples from the (rows, steps) new tokens, cut after the first stop
        token, with each token's raw logprob from `step_logits` (one (rows, vocab) tensor per step) if asked."""
        token_logps = _sampled_logprobs(step_logits, new).cpu() if sampling.logprobs else None
        new = new.cpu()
        samples = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), None)
            ids = ids[:end] if end else ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            logprobs = token_logps[row, : len(ids)].tolist() if token_logps is not None else []
            samples.append(Sample(text=text, token_ids=ids, logprobs=logprobs, finished=end is not None))
        return [samples[i * sampling.n : (i + 1) * sampling.n] for i in range(prompts)]

    def _prompt_cache(self, input_ids: torch.Tensor, attention: torch.Tensor, copies: int):
        """(key/value cache, fp32 logits (rows, vocab) of the next token) of each left-padded prompt, computed
        once and repeated for its `copies` samples: `num_return_sequences` would repeat the prompts first and
        run each copy through the model, the last prompt token included. Positions follow generate's own
        rule for left padding (count real tokens from 0), so the samples are the ones it would draw."""
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        out.past_key_values.batch_repeat_interleave(copies)
        return out.past_key_values, out.logits[:, -1].float().repeat_interleave(copies, 0)

    # Engines that hold their own copy of the weights need these; this one samples from the live model.
    def sleep(self) -> None:
        """Nothing to free: the model belongs to the caller."""

    def wake(self) -> None:
        """Nothing to restore."""

    def close(self) -> None:
        """Nothing to stop."""


def _sampled_logprobs(step_logits: tuple, tokens: torch.Tensor) -> torch.Tensor:
    """(rows, steps) raw log-softmax of each step's logits at the sampled token, one step at a time (fp32)."""
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for t, logits in enumerate(step_logits):
        out[:, t] = logprobs_from_logits(logits.float(), tokens[:, t])
    return out


def _sample_first_token(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """(rows,) one token per row drawn from fp32 `logits` as generate draws each step (temperature, then
    top-p, softmax, multinomial): the shared-prompt path samples the first token itself. Only the sampling
    config's settings apply, as in the vLLM engine (generate adds a checkpoint's other defaults, if any)."""
    scores = TemperatureLogitsWarper(sampling.temperature)(None, logits)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1)


def _is_fp32(model) -> bool:
    return next(model.parameters()).dtype == torch.float32


def greedy_texts(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, precision: str = "fp32"
) -> list[str]:
    """One greedy completion per prompt (a message list) from a model in memory: held-out checks."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    return [s[0].text for s in HFEngine(model, tokenizer, precision).generate(prompts, sampling)]
