"""Rollout batches for RL and preference scoring: pack prompt+completion token ids, and score the
response tokens with models without full-vocabulary logits.

Sequences are right-padded: `input_ids[b] = prompt + completion + pad`. `response_mask[b, t]` marks the
positions t of completion tokens; the logits that predict token t sit at position t-1, so every
per-token quantity here (logprobs, values, entropies) is aligned to the completion tokens themselves.

Log-probabilities are computed only where the response mask is set, from the body's hidden states and
the output head one chunk of tokens at a time (algos/logits.py): no `[batch, seq, vocab]` tensor exists,
which is what keeps Gemma's 262k vocabulary within memory.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from .algos.logits import LinearHead, chunk_tokens_for, chunked_token_logprobs, plain_linear
from .chat import chat_prompt_ids, rendered_ids
from .engines.base import Sample
from .lora import unwrap
from .models import prompt_cache_supported, stop_token_ids, zero3_partitioned

log = logging.getLogger("posttrain")

LEAN_FAMILIES = {"llama", "gemma", "gemma2", "gemma3_text", "recurrent_gemma", "qwen2", "qwen3", "mistral"}
"""Families whose logits are exactly softcap(lm_head(body(x))) (checked against transformers 5.19's
modelling code); others are scored from their full logits, with a warning."""


@dataclass
class RolloutBatch:
    """Token-level tensors of one rollout, all (batch, seq) unless noted."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    """1.0 at completion tokens (including the end-of-turn token when produced)."""
    engine_logprobs: torch.Tensor | None
    """Logprobs the sampling engine reported for the completion tokens (0 elsewhere, or when it reported none);
    None for pairs that were not sampled (preference data)."""
    finished: torch.Tensor | None
    """(batch,) bool: the completion ended its turn; None for pairs that were not sampled."""

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        """The rows `idx`; a field that is None (pairs that were not sampled) stays None."""
        return self._map(lambda t: t[idx])

    def to(self, device: torch.device) -> "RolloutBatch":
        return self._map(lambda t: t.to(device))

    def _map(self, fn) -> "RolloutBatch":
        return RolloutBatch(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)})


def pack_rollout(
    prompt_ids: list[list[int]], samples: list, pad_id: int, device: torch.device | str = "cpu"
) -> RolloutBatch:
    """Right-padded tensors on `device` from prompts and their samples (one sample per prompt entry)."""
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
        response[i, len(p) : end] = 1
        if s.logprobs:
            engine_lp[i, len(p) : end] = torch.tensor(s.logprobs[: len(s.token_ids)])
    finished = torch.tensor([s.finished for s in samples], dtype=torch.bool)
    return RolloutBatch(input_ids, attention, response, engine_lp, finished).to(torch.device(device))


def answer_tokens(tokenizer, rows: list[dict]) -> tuple[list[list[int]], list]:
    """Each row's prompt ids and its own final assistant turn as a Sample whose token ids run up to and
    including its end-of-turn token (`pack_rollout` pads them into a batch)."""
    stops, prompts, samples = set(stop_token_ids(tokenizer)), [], []
    for row in rows:
        prompt, full = chat_prompt_ids(tokenizer, row["messages"][:-1]), rendered_ids(tokenizer, row["messages"])
        if row["messages"][-1]["role"] != "assistant" or full[: len(prompt)] != prompt:
            raise ValueError(
                "expected a conversation ending in an assistant turn that the chat template renders "
                f"after the generation prompt; got {row['messages'][-1]}"
            )
        answer = full[len(prompt) :]
        end = next((i + 1 for i, t in enumerate(answer) if t in stops), None)
        prompts.append(prompt)
        samples.append(Sample(text=row["messages"][-1]["content"], token_ids=answer[:end], finished=end is not None))
    return prompts, samples


def answer_batch(tokenizer, rows: list[dict], device: torch.device | str = "cpu") -> RolloutBatch:
    """`answer_tokens` packed into a rollout batch whose response mask covers the answers: PPO-ptx's
    likelihood term, and the implicit reward model's scores."""
    return pack_rollout(*answer_tokens(tokenizer, rows), tokenizer.pad_token_id, device)


def _shift(per_position: torch.Tensor) -> torch.Tensor:
    """Move predictions made at position t-1 onto token t (position 0 gets 0)."""
    return torch.nn.functional.pad(per_position, (1, 0))


def lm_parts(model):
    """(body, head, soft-cap, vocabulary size) of a causal LM (inside a peft wrapper), or None when its
    family's logits are not known to be softcap(head(body)) exactly."""
    base = unwrap(model)
    config = base.config
    if getattr(config, "model_type", None) not in LEAN_FAMILIES or not hasattr(base, "model"):
        return None
    cap = getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_soft_cap", None)
    return base.model, base.get_output_embeddings(), cap, config.vocab_size


class _GradAfterEmbedding(torch.autograd.Function):
    """Identity on a weight, created before the body's forward so that autograd runs its backward after
    the input embedding's (it runs nodes in reverse order of creation). See `tied_head`."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _densify(weight: torch.Tensor) -> None:
    """A sparse-only gradient (the head's part never arrived) made dense for the optimiser."""
    if weight.grad is not None and weight.grad.is_sparse:
        weight.grad = weight.grad.to_dense()


@contextmanager
def tied_head(model, head):
    """The head to score with while the body runs inside this block. Where the head's weight is the input
    embedding's (Gemma's tied embedding) and gradients flow, autograd would hold two dense
    vocabulary x hidden gradients at once: the head's and the embedding's (which touches only the
    batch's rows), then add them. At vocabulary 262144 each is 0.54 GB per 512 hidden units. Here the
    embedding gives a sparse gradient (its rows only) that reaches the weight first, and the head's dense
    gradient, routed through a node created before the body, arrives last and takes the rows in place:
    one dense gradient. Elsewhere (frozen, untied, ZeRO-3, no gradient) the head is unchanged."""
    embedding = unwrap(model).get_input_embeddings()
    weight = getattr(head, "weight", None)
    if not (
        torch.is_grad_enabled()
        and plain_linear(head)  # a linear layer, not a ZeRO-3 partition
        and isinstance(embedding, torch.nn.Embedding)
        and embedding.weight is weight
        and weight.requires_grad
        and not embedding.sparse
    ):
        yield head
        return
    if not getattr(weight, "_posttrain_densify", False):
        weight.register_post_accumulate_grad_hook(_densify)
        weight._posttrain_densify = True
    late = LinearHead(_GradAfterEmbedding.apply(weight), head.bias)
    embedding.sparse = True
    try:
        yield late
    finally:
        embedding.sparse = False


_warned: set[str] = set()


def hidden_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, where: torch.Tensor):
    """(hidden (N, H), head, soft-cap, vocabulary) at the positions `where` (B, T-1) that predict a next
    token, so that softcap(head(hidden)) are their logits. A family outside LEAN_FAMILIES gives its full
    logits there with an identity head (computed whole, with a warning once)."""
    parts = lm_parts(model)
    if parts is None:
        kind = getattr(unwrap(model).config, "model_type", "?")
        if kind not in _warned:
            _warned.add(kind)
            log.warning("model type %r: scoring from full-vocabulary logits (not a known lean family)", kind)
        logits = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1]).logits
        return logits[where], (lambda h: h), None, logits.shape[-1]
    body, head, cap, vocab = parts
    with tied_head(model, head) as head:
        hidden = _plain_hidden(body, input_ids, attention_mask, where)
    return hidden, head, cap, vocab


def _plain_hidden(body, input_ids: torch.Tensor, attention_mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The body's hidden states (N, H) at `where`, each row run whole. The last position predicts nothing: it
    is not run (causal, so the others are unchanged)."""
    return body(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1]).last_hidden_state[where]


def token_logprobs(
    model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False, with_raw: bool = False
):
    """Log-probability of each response token under `model` with logits divided by `temperature` (the
    distribution rollouts were sampled from), aligned to tokens and zero outside the response mask;
    optionally the entropy of that distribution and the raw (T=1) logprobs engines report. All fp32."""
    temperature = temperature if temperature not in (0, None) else 1.0
    labels = batch.input_ids[:, 1:]
    where = batch.response_mask[:, 1:].bool()  # position t-1 predicts response token t
    if (parts := lm_parts(model)) is None:
        hidden, head, cap, vocab = hidden_at(model, batch.input_ids, batch.attention_mask, where)
    else:
        body, head, cap, vocab = parts
        with tied_head(model, head) as head:
            hidden = response_hidden(unwrap(model), body, batch, where)
    stats = chunked_token_logprobs(
        hidden,
        labels[where],
        head,
        cap=cap,
        temperature=temperature,
        with_entropy=with_entropy,
        with_raw=with_raw,
        chunk_tokens=chunk_tokens_for(vocab),
    )
    zeros = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    out = [_shift(zeros.masked_scatter(where, values)) for values in stats]
    return out[0] if len(out) == 1 else tuple(out)


def _prompt_plan(batch: RolloutBatch):
    """(prompt lengths (B,), response lengths (B,), one row per distinct prompt (U,), each row's prompt
    (B,)) when every row is prompt + response + padding and some rows share a prompt; else None."""
    response, attention = batch.response_mask.bool(), batch.attention_mask.bool()
    lengths = response.sum(1)
    if not bool((lengths > 0).all()):
        return None
    starts = response.int().argmax(1)
    if not bool((starts > 0).all()):
        return None  # a response with no prompt before it
    positions = torch.arange(response.shape[1], device=response.device)
    ends = (starts + lengths)[:, None]
    if not (
        bool((response == ((positions >= starts[:, None]) & (positions < ends))).all())
        and bool((attention == (positions < ends)).all())
    ):
        return None  # not the packed layout (e.g. tokens after the response): nothing to share safely
    firsts: dict[tuple, int] = {}
    prompt_of_row = [
        firsts.setdefault(tuple(ids[:n]), row)
        for row, (ids, n) in enumerate(zip(batch.input_ids.tolist(), starts.tolist()))
    ]
    if len(firsts) == len(prompt_of_row):
        return None
    unique = list(firsts.values())
    index = {row: i for i, row in enumerate(unique)}
    as_tensor = lambda xs: torch.tensor(xs, device=response.device)  # noqa: E731
    return starts, lengths, as_tensor(unique), as_tensor([index[r] for r in prompt_of_row])


def shared_prompt_plan(model, batch: RolloutBatch):
    """How the rows of `batch` share prompts (`_prompt_plan`), where `model` (a transformers model outside
    any peft wrapper) can take a cached prompt at this batch's width; None where sharing does not apply: no
    shared prompt, or what `models.prompt_cache_supported` refuses (a family without a plain key/value
    cache, gradient checkpointing, ZeRO-3, a sequence reaching the sliding window).

    Under a plan each distinct prompt runs through the body once, its key/value cache is copied to the rows
    that share it (GRPO's group of samples, a preference pair), and only the responses run on from there.
    With G samples per prompt of P tokens this saves (G-1)/G of the prompt's share of the body's forward and
    backward passes. The same idea as SGLang's RadixAttention prefix reuse and "shared-prefix" RL training,
    applied to one batch; values equal the plain forward to rounding (tests/test_lean_logprobs.py)."""
    return _prompt_plan(batch) if prompt_cache_supported(model, batch.input_ids.shape[1]) else None


def _prompt_pass(body, batch: RolloutBatch, starts, unique):
    """The first of the shared-prompt passes: each distinct prompt (rows `unique`) through the body once.
    (key/value cache, hidden state at each prompt's last token, prompt attention mask), one row each."""
    device = batch.input_ids.device
    prompt_width = int(starts[unique].max())
    prompt_mask = (torch.arange(prompt_width, device=device) < starts[unique][:, None]).long()
    prompt_ids = batch.input_ids[unique, :prompt_width] * prompt_mask
    out = body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    last = out.last_hidden_state[torch.arange(len(unique), device=device), starts[unique] - 1]
    return out.past_key_values, last, prompt_mask


def _responses_pass(body, batch: RolloutBatch, plan, prompts, rows: torch.Tensor | slice) -> torch.Tensor:
    """The second pass for `rows` of the batch (indices, or `slice(None)` for all): their responses continue
    from their prompts' cache (from `_prompt_pass`), cut to these rows' longest response. Hidden states (N, H)
    at the positions that predict the rows' response tokens, row by row."""
    starts, lengths, _, prompt_of_row = plan
    starts, lengths, prompt_of_row = starts[rows], lengths[rows], prompt_of_row[rows]
    cache, last, prompt_mask = prompts
    cache = copy.copy(cache)  # a shallow copy per call: each selects its own rows and grows its own keys
    cache.layers = [copy.copy(layer) for layer in cache.layers]
    cache.batch_select_indices(prompt_of_row)
    device, width = batch.input_ids.device, int(lengths.max())
    cols = torch.arange(width, device=device)
    in_response = cols < lengths[:, None]
    per_token = last[prompt_of_row][:, None]  # token 0 of a response is predicted by its prompt's last position
    if width > 1:  # token j by position j-1 of the response; the last token predicts nothing and is not run
        fed = cols[:-1]
        taken = (starts[:, None] + fed).clamp(max=batch.input_ids.shape[1] - 1)
        response_ids = batch.input_ids[rows].gather(1, taken) * in_response[:, :-1]
        mask = torch.cat([prompt_mask[prompt_of_row], in_response[:, :-1].long()], 1)
        # Position ids are explicit: a short prompt's padding sits between it and its response in the cache.
        on = body(
            input_ids=response_ids,
            attention_mask=mask,
            position_ids=starts[:, None] + fed,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        per_token = torch.cat([per_token, on], 1)
    return per_token[in_response]


GROUP_MAX = 4
"""The most length groups a batch is scored in (`length_groups`)."""
GROUP_MIN_POSITIONS = 256
"""A further length group must save this many body positions (forward and backward), so that its extra
body passes, each with its own per-call cost and smaller matrix multiplies, cost little beside what it saves."""


def split_by_length(lengths: list[int], max_groups: int) -> list[tuple[int, list[int]]]:
    """For k = 1, 2, ... up to `max_groups` (and the number of distinct lengths), (positions, cut points) of
    the cheapest split of the rows, sorted by length, into k contiguous groups, each padded to its longest
    row: positions = sum over groups of rows x longest. Exact, by dynamic programming over the distinct
    lengths; the cut points are the groups' ends in the sorted rows."""
    ordered = torch.tensor(sorted(lengths), dtype=torch.long)
    ends = torch.cat([torch.nonzero(ordered[1:] != ordered[:-1])[:, 0] + 1, torch.tensor([len(ordered)])])
    longest = ordered[ends - 1]
    cost = ends * longest  # one group: the rows up to each distinct length, padded to it
    backs = []
    out = [(int(cost[-1]), [int(ends[-1])])]
    for _ in range(1, min(max_groups, len(ends))):
        new_cost, back = cost.clone(), torch.zeros_like(ends)
        for j in range(1, len(ends)):  # a last group from ends[i] to ends[j], after the best split up to ends[i]
            options = cost[:j] + (ends[j] - ends[:j]) * longest[j]
            back[j] = torch.argmin(options)
            new_cost[j] = options[back[j]]
        cost = new_cost
        backs.append(back)
        cuts, j = [int(ends[-1])], len(ends) - 1
        for back in reversed(backs):
            j = int(back[j])
            cuts.insert(0, int(ends[j]))
        out.append((int(cost[-1]), cuts))
    return out


def row_lengths(batch: RolloutBatch) -> torch.Tensor:
    """(B,) the positions each row of a right-padded batch runs: up to its last attended token."""
    attended = batch.attention_mask.bool()
    return torch.where(attended, torch.arange(1, attended.shape[1] + 1, device=attended.device), 0).amax(1)


def length_groups(body, lengths: torch.Tensor) -> list[tuple[torch.Tensor, int]] | None:
    """Rows grouped by length so that short rows are not padded to the longest (row indices, longest
    length per group), or None to run the batch in one pass; `lengths` (B,) are the positions each row
    runs. Right padding costs every row the longest row's positions in the body's forward and backward
    passes; RL samples and preference answers vary in length (the reason verl and OpenRLHF pack or strip
    padding). A further group is taken only where it saves `GROUP_MIN_POSITIONS`. Not when `body` is under
    ZeRO-3, whose gathers are collectives (every rank must make the same body passes)."""
    if zero3_partitioned(body) or len(lengths) < 2:
        return None
    if int(lengths.max()) * len(lengths) - int(lengths.sum()) < GROUP_MIN_POSITIONS:
        return None  # all the padding there is would not pay for a further group
    splits = split_by_length(lengths.tolist(), GROUP_MAX)
    chosen = splits[0]
    for split in splits[1:]:
        saved = chosen[0] - split[0]
        if saved < GROUP_MIN_POSITIONS:
            break
        chosen = split
    if len(chosen[1]) == 1:
        return None
    rows = torch.argsort(lengths, stable=True)
    bounds = [0] + chosen[1]
    groups = [rows[a:b].sort().values for a, b in zip(bounds, bounds[1:])]
    return [(g, int(lengths[g].max())) for g in groups]


def response_hidden(model, body, batch: RolloutBatch, where: torch.Tensor) -> torch.Tensor:
    """The hidden states (N, H) of `body` (inside `model`, a transformers model outside any peft wrapper) at
    the positions `where` (B, T-1) that predict the batch's response tokens, row by row. Rows that share a
    prompt (`shared_prompt_plan`) run it once and continue their responses from its cache; otherwise each
    row runs whole. Either way rows of very different lengths run in length groups (`length_groups`), each
    cut to its own longest row (by response length where prompts are shared: the prompts run once for all
    groups)."""
    plan = shared_prompt_plan(model, batch)
    if plan is not None:
        starts, response_lengths, unique, _ = plan
        groups = length_groups(body, response_lengths)
        prompts = _prompt_pass(body, batch, starts, unique)
        if groups is None:
            return _responses_pass(body, batch, plan, prompts, slice(None))
        pieces = [_responses_pass(body, batch, plan, prompts, rows) for rows, _ in groups]
    else:
        groups = length_groups(body, row_lengths(batch))
        if groups is None:
            return _plain_hidden(body, batch.input_ids, batch.attention_mask, where)
        pieces = [
            _plain_hidden(
                body, batch.input_ids[rows, :width], batch.attention_mask[rows, :width], where[rows, : width - 1]
            )
            for rows, width in groups
        ]
    # pieces hold the rows in group order; the batch's order is row by row.
    counts = where.sum(1)
    order = torch.cat([rows for rows, _ in groups])
    start = torch.zeros_like(counts)
    start[order] = torch.cumsum(counts[order], 0) - counts[order]  # each row's first token in the pieces
    first = torch.cumsum(counts, 0) - counts  # ... and in the batch's order
    index = torch.repeat_interleave(start - first, counts) + torch.arange(int(counts.sum()), device=counts.device)
    return torch.cat(pieces)[index]


def token_values(value_model, batch: RolloutBatch) -> torch.Tensor:
    """V(state before token t) for every response token t (0 elsewhere), from a sequence-classification
    model's backbone + head. The backbone runs as the policy's body does in `token_logprobs`: response
    positions only, in length groups, prompts shared (`response_hidden`)."""
    value_model = unwrap(value_model)  # LoRA: the adapted model inside peft's wrapper
    where = batch.response_mask[:, 1:].bool()  # the state before response token t is position t-1
    hidden = response_hidden(value_model, value_model.base_model, batch, where)
    values = value_model.score(hidden).squeeze(-1).float()
    return _shift(torch.zeros(where.shape, dtype=values.dtype, device=where.device).masked_scatter(where, values))
