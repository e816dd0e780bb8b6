"""Rollout batches for PPO: pack prompt+completion token ids, and score response tokens with models.

Sequences are right-padded: `input_ids[b] = prompt + completion + pad`. `response_mask[b, t]` marks the
positions t of completion tokens; the logits that predict token t sit at position t-1, so every
per-token quantity here (logprobs, values, entropies) is aligned to the completion tokens themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .algos.ppo import entropy_from_logits, logprobs_from_logits


@dataclass
class RolloutBatch:
    """Token-level tensors of one rollout, all (batch, seq) unless noted."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    """1.0 at completion tokens (including the end-of-turn token when produced)."""
    engine_logprobs: torch.Tensor
    """Logprobs the sampling engine reported for the completion tokens (0 elsewhere)."""
    finished: torch.Tensor
    """(batch,) bool: the completion ended its turn."""

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def pack_rollout(prompt_ids: list[list[int]], samples: list, pad_id: int) -> RolloutBatch:
    """Right-padded tensors from prompts and their samples (one sample per prompt entry)."""
    rows = [p + s.token_ids for p, s in zip(prompt_ids, samples, strict=True)]
    width = max(len(r) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros(n, width)
    response = torch.zeros(n, width)
    engine_lp = torch.zeros(n, width)
    for i, (p, s) in enumerate(zip(prompt_ids, samples)):
        end = len(p) + len(s.token_ids)
        input_ids[i, :end] = torch.tensor(p + s.token_ids)
        attention[i, :end] = 1
        response[i, len(p):end] = 1
        if s.logprobs:
            engine_lp[i, len(p):end] = torch.tensor(s.logprobs[: len(s.token_ids)])
    finished = torch.tensor([s.finished for s in samples], dtype=torch.bool)
    return RolloutBatch(input_ids, attention, response, engine_lp, finished)


def answer_tokens(tokenizer, rows: list[dict]) -> tuple[list[list[int]], list]:
    """Each row's prompt ids and its own final assistant turn as a Sample whose token ids run up to and
    including its end-of-turn token (`pack_rollout` pads them into a batch)."""
    from .evaluation import rendered_ids
    from .generate import Sample, chat_prompt_ids
    from .models import stop_token_ids

    stops, prompts, samples = set(stop_token_ids(tokenizer)), [], []
    for row in rows:
        prompt, full = chat_prompt_ids(tokenizer, row["messages"][:-1]), rendered_ids(tokenizer, row["messages"])
        if row["messages"][-1]["role"] != "assistant" or full[:len(prompt)] != prompt:
            raise ValueError("expected a conversation ending in an assistant turn that the chat template renders "
                             f"after the generation prompt; got {row['messages'][-1]}")
        answer = full[len(prompt):]
        end = next((i + 1 for i, t in enumerate(answer) if t in stops), None)
        prompts.append(prompt)
        samples.append(Sample(text=row["messages"][-1]["content"], token_ids=answer[:end], finished=end is not None))
    return prompts, samples


def answer_batch(tokenizer, rows: list[dict]) -> RolloutBatch:
    """`answer_tokens` packed into a rollout batch whose response mask covers the answers: PPO-ptx's
    likelihood term, and the implicit reward model's scores."""
    return pack_rollout(*answer_tokens(tokenizer, rows), tokenizer.pad_token_id)


def _shift(per_position: torch.Tensor) -> torch.Tensor:
    """Move predictions made at position t-1 onto token t (position 0 gets 0)."""
    return torch.nn.functional.pad(per_position, (1, 0))


def token_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False,
                   with_raw: bool = False):
    """Log-probability of each token under `model` with logits divided by `temperature` (the
    distribution rollouts were sampled from), aligned to tokens; optionally the entropy of that
    distribution and the raw (T=1) logprobs engines report."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    labels = batch.input_ids[:, 1:]
    tempered = logits / temperature if temperature not in (0, 1) else logits
    out = [_shift(logprobs_from_logits(tempered, labels))]
    if with_entropy:
        out.append(_shift(entropy_from_logits(tempered)))
    if with_raw:
        out.append(out[0] if tempered is logits else _shift(logprobs_from_logits(logits, labels)))
    return out[0] if len(out) == 1 else tuple(out)


def token_values(value_model, batch: RolloutBatch) -> torch.Tensor:
    """V(state before token t) for every token t, from a sequence-classification model's backbone + head."""
    from .lora import unwrap

    value_model = unwrap(value_model)  # LoRA: the adapted model inside peft's wrapper
    backbone = value_model.base_model
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    values = value_model.score(hidden).squeeze(-1)[:, :-1].float()
    return _shift(values)
