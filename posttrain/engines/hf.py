"""Hugging Face `generate` backend over a model already in memory (any family, RecurrentGemma included).

It samples from the live model object, so a trainer that owns the model needs no weight push. Prompts
are left-padded into batches; generation stops on `<eos>` and `<end_of_turn>`.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

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
        # Greedy copies would all be alike: generate refuses n > 1 there. Sampled copies are rows of their own
        # (as num_return_sequences would repeat them), sharing the prompt's cache where the model allows.
        if copies > 1 and not greedy:
            if prompt_cache_supported(unwrap(self.model), width + sampling.max_new_tokens):
                cache, first_logits = self._prompt_cache(input_ids, attention, copies)
            input_ids, attention = (t.repeat_interleave(copies, 0) for t in (input_ids, attention))
            copies = 1
        if first_logits is not None:
            first = draw_tokens(first_logits, sampling.temperature, sampling.top_p)
            first_logits = first_logits if sampling.logprobs else None  # (rows, vocab): 32 MiB at 262k x 32
            new_tokens -= 1  # the first token is drawn
            if new_tokens == 0:
                return self._samples(first[:, None], (first_logits,), sampling, len(batch))
            # generate continues from the first sampled token: the prompt is all in the cache. A row whose
            # first token ends its turn runs on unseen by generate; `_samples` cuts it at that token.
            input_ids = torch.cat([input_ids, first[:, None]], 1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
            shared = {"past_key_values": cache}
        # generate runs greedy: when sampling, its argmax takes the token `_DrawNextToken` drew (below).
        draw = [] if greedy else [_DrawNextToken(sampling, keeps_logits=sampling.logprobs)]
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList(draw),
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


def draw_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(rows,) one token per row from fp32 `logits` (rows, vocab): temperature, nucleus (top-p; Holtzman et
    al. 2020, "The Curious Case of Neural Text Degeneration"), then inverse transform sampling: a uniform
    draw located in the row's cumulative distribution, both in float64 so that each of a 262k vocabulary's
    rarest tokens keeps its probability. The distribution generate's torch.multinomial draws from, at 0.42x
    its CPU time for 32 rows of vocabulary 262144 (bench/sampling.py). Zero-probability tokens (cut by
    top-p) are never drawn: their cumulative value equals the previous one and the search takes the right
    end of a tie."""
    scores = logits / temperature if temperature != 1.0 else logits
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    cdf = torch.softmax(scores, -1).cumsum(-1, dtype=torch.float64)
    target = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


class _DrawNextToken(LogitsProcessor):
    """Generate's sampling step as its last logits processor: draws each row's next token with `draw_tokens`
    and leaves only that token's score finite, so that generate's greedy argmax takes it. In place unless
    generate keeps the logits it passed in (`output_logits`: the logprobs)."""

    def __init__(self, sampling: SamplingConfig, keeps_logits: bool):
        self.temperature, self.top_p, self.keeps_logits = sampling.temperature, sampling.top_p, keeps_logits

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = draw_tokens(scores, self.temperature, self.top_p)
        out = torch.empty_like(scores) if self.keeps_logits else scores
        return out.fill_(float("-inf")).scatter_(1, tokens[:, None], 0.0)


def _is_fp32(model) -> bool:
    return next(model.parameters()).dtype == torch.float32


def greedy_texts(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, precision: str = "fp32"
) -> list[str]:
    """One greedy completion per prompt (a message list) from a model in memory: held-out checks."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    return [s[0].text for s in HFEngine(model, tokenizer, precision).generate(prompts, sampling)]
