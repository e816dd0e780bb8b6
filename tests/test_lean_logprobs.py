"""Lean log-probabilities: chunked over tokens, they equal the full [batch, seq, vocab] computation (values,
entropies, raw logprobs, gradients), for every family's output head (Gemma 2 and RecurrentGemma soft-cap)."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from posttrain.algos.logits import chunk_tokens_for, chunked_token_logprobs, softcap
from posttrain.config import LoraSection
from posttrain.engines import Sample
from posttrain.lora import add_adapters
from posttrain.models import ModelConfig, build_tiny_model, enable_gradient_checkpointing
from posttrain.rollout import pack_rollout, token_logprobs

from .conftest import TINY
from .test_devices import CPU_AND_CUDA

torch.set_num_threads(1)


def full_stats(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """The plain computation: whole log-softmax over the vocabulary."""
    z = logits.float() / temperature
    logp = torch.log_softmax(z, -1)
    picked = logp.gather(-1, labels[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    raw = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]
    return picked, entropy, raw


@pytest.mark.parametrize("temperature,cap", [(1.0, None), (0.7, None), (1.0, 30.0), (0.5, 5.0)])
def test_chunked_equals_full_values_and_gradients(temperature, cap):
    torch.manual_seed(0)
    n, hidden, vocab = 37, 16, 301
    h = torch.randn(n, hidden, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    labels = torch.randint(vocab, (n,))
    logp, ent, raw = chunked_token_logprobs(
        h, labels, head, cap=cap, temperature=temperature, with_entropy=True, with_raw=True, chunk_tokens=5
    )  # 8 chunks, the last one short
    ref_logp, ref_ent, ref_raw = full_stats(softcap(head(h), cap), labels, temperature)
    for got, want in ((logp, ref_logp), (ent, ref_ent), (raw, ref_raw)):
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)

    weights = torch.randn(n)  # any downstream loss: gradients through the recomputed chunks are the same
    (g_h, g_w) = torch.autograd.grad((logp * weights).sum(), [h, head.weight])
    (r_h, r_w) = torch.autograd.grad((ref_logp * weights).sum(), [h, head.weight])
    assert torch.allclose(g_h, r_h, atol=1e-5) and torch.allclose(g_w, r_w, atol=1e-5)


@pytest.mark.parametrize("bias,frozen", [(True, False), (False, True), (True, True)])
def test_linear_head_backward_with_bias_and_frozen_parts(bias, frozen):
    """The linear head's own backward: gradients for the bias too, and only for what requires them (a frozen
    head, as in a reference model; hidden states that need none, as when only the head trains)."""
    torch.manual_seed(1)
    n, hidden, vocab = 23, 8, 97
    head = torch.nn.Linear(hidden, vocab, bias=bias).requires_grad_(not frozen)
    h = torch.randn(n, hidden, requires_grad=frozen)
    labels = torch.randint(vocab, (n,))
    (logp,) = chunked_token_logprobs(h, labels, head, cap=10.0, temperature=0.9, chunk_tokens=6)
    ref_logp, _, _ = full_stats(softcap(head(h), 10.0), labels, 0.9)
    assert torch.allclose(logp, ref_logp, atol=1e-5)
    wanted = [h] if frozen else [p for p in head.parameters()]
    got = torch.autograd.grad(logp.square().sum(), wanted)
    want = torch.autograd.grad(ref_logp.square().sum(), wanted)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


def test_linear_head_matches_the_generic_path_under_autocast():
    """bf16 autocast (mixed precision): the linear head's own backward and autograd through checkpointed
    chunks of the same head (seen as an arbitrary callable) agree within bf16 rounding."""
    torch.manual_seed(2)
    n, hidden, vocab = 19, 16, 211
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(n, hidden, requires_grad=True)
    labels = torch.randint(vocab, (n,))
    results = []
    for as_callable in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, ent = chunked_token_logprobs(
                h,
                labels,
                (lambda x: head(x)) if as_callable else head,
                cap=30.0,
                temperature=0.7,
                with_entropy=True,
                chunk_tokens=4,
            )
        results.append((logp, ent, *torch.autograd.grad(logp.sum(), [h, head.weight])))
    for fused, generic in zip(*results):
        assert torch.allclose(fused, generic, atol=2e-2, rtol=2e-2)


def test_chunk_size_follows_the_vocabulary():
    assert chunk_tokens_for(262144) == 64 and chunk_tokens_for(512) == 32768
    assert chunk_tokens_for(10**9) == 16  # never below 16 tokens


def test_no_tokens_and_bad_temperature():
    head = torch.nn.Linear(4, 7)
    assert chunked_token_logprobs(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), head)[0].shape == (0,)
    with pytest.raises(ValueError, match="temperature"):
        chunked_token_logprobs(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), head, temperature=0.0)


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(6, vocab, (k,), generator=g).tolist() for k in (5, 9, 3)]
    samples = [Sample(text="", token_ids=torch.randint(6, vocab, (k,), generator=g).tolist()) for k in (4, 1, 7)]
    return pack_rollout(prompts, samples, pad_id=0)


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "recurrent_gemma"])
def test_token_logprobs_equal_the_models_own_logits(tiny_tokenizer, family):
    """What the RL stage, the implicit reward and WARP's KL read: equal to log-softmax of model(...).logits
    (soft-capping included) at response tokens, zero elsewhere, with and without grad."""
    model = build_tiny_model(ModelConfig(family=family, **TINY), tiny_tokenizer, seed=1).eval()
    batch = _batch(len(tiny_tokenizer))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    want_logp, want_ent, _ = (
        torch.nn.functional.pad(t.view(batch.input_ids.shape[0], -1), (1, 0))
        for t in full_stats(logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1), 0.8)
    )
    mask = batch.response_mask
    logp, ent = token_logprobs(model, batch, temperature=0.8, with_entropy=True)
    assert torch.allclose(logp, want_logp * mask, atol=1e-5) and torch.allclose(ent, want_ent * mask, atol=1e-5)
    assert (logp[mask == 0] == 0).all()
    model.train()
    with_grad = token_logprobs(model, batch, temperature=0.8)
    assert with_grad.requires_grad
    (with_grad * mask).sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def _grouped_batch(vocab: int, seed: int = 0, response_lengths=(4, 1, 7, 2)):
    """Three prompts of different lengths, a response of each length for each, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        (prompt, torch.randint(6, vocab, (k,), generator=g).tolist())
        for prompt in (torch.randint(6, vocab, (n,), generator=g).tolist() for n in (5, 9, 3))
        for k in response_lengths
    ]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    return pack_rollout([p for p, _ in rows], [Sample(text="", token_ids=c) for _, c in rows], pad_id=0)


@pytest.mark.parametrize(
    "family,response_lengths",
    [
        ("llama", (4, 1, 7, 2)),
        ("gemma", (4, 1, 7, 2)),
        ("gemma2", (4, 1, 7, 2)),
        ("gemma2", (1, 1)),
        ("recurrent_gemma", (4, 1, 7, 2)),
    ],
)
def test_shared_prompt_scoring_equals_the_plain_forward(tiny_tokenizer, family, response_lengths, monkeypatch):
    """Rows that share a prompt run it through the body once (its cache copied to them): logprobs and every
    parameter's gradient equal the plain forward of each whole row (one-token responses too: then only the
    prompts run). RecurrentGemma (no key/value cache) and batches without a shared prompt take the plain
    forward."""
    from posttrain import rollout

    model = build_tiny_model(ModelConfig(family=family, **TINY), tiny_tokenizer, seed=1).train()
    batch = _grouped_batch(len(tiny_tokenizer), response_lengths=response_lengths)
    weights = torch.randn(batch.input_ids.shape)  # any downstream loss
    assert (rollout.shared_prompt_plan(model, batch) is None) == (family == "recurrent_gemma")
    assert rollout.shared_prompt_plan(model, _batch(len(tiny_tokenizer))) is None  # three distinct prompts

    def logp_and_grads():
        logp = token_logprobs(model, batch, temperature=0.8)
        return logp, torch.autograd.grad((logp * weights).sum(), list(model.parameters()))

    shared, shared_grads = logp_and_grads()
    monkeypatch.setattr(rollout, "shared_prompt_plan", lambda *_: None)
    plain, plain_grads = logp_and_grads()
    assert torch.allclose(shared, plain, atol=1e-5) and (shared[batch.response_mask == 0] == 0).all()
    for got, want in zip(shared_grads, plain_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_shared_prompt_scoring_steps_aside_for_checkpointing_zero3_and_the_window(tiny_tokenizer):
    from posttrain.models import prompt_cache_supported
    from posttrain.rollout import shared_prompt_plan

    model = build_tiny_model(ModelConfig(family="gemma2", **TINY, sliding_window=16), tiny_tokenizer, seed=1)
    batch = _grouped_batch(len(tiny_tokenizer))  # 16 tokens wide: reaches the window
    assert not prompt_cache_supported(model, 16) and prompt_cache_supported(model, 14)
    assert shared_prompt_plan(model, batch) is None
    model = build_tiny_model(ModelConfig(family="llama", **TINY), tiny_tokenizer, seed=1).train()
    model.gradient_checkpointing_enable()
    assert shared_prompt_plan(model, batch) is None
    model.eval()  # checkpointing only acts in training
    assert shared_prompt_plan(model, batch) is not None
    no_prompt = pack_rollout([[], []], [Sample(text="", token_ids=[7, 8]), Sample(text="", token_ids=[9])], pad_id=0)
    assert shared_prompt_plan(model, no_prompt) is None  # an empty prompt has no cache to share
    next(model.model.parameters()).ds_id = 0  # as DeepSpeed ZeRO-3 marks a partitioned weight
    assert shared_prompt_plan(model, batch) is None  # its gathers are collectives: every rank runs alike


def test_token_logprobs_through_lora_and_disabled_adapters(tiny_tokenizer):
    model = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=2)
    peft = add_adapters(model, LoraSection(enabled=True, r=4, alpha=8), "CAUSAL_LM")
    with torch.no_grad():  # move the adapters off zero so that on and off differ
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    batch = _grouped_batch(len(tiny_tokenizer), seed=3)  # shared prompts: the cache path through the adapters
    mask = batch.response_mask
    for adapters_on in (True, False):
        ctx = torch.no_grad() if adapters_on else peft.disable_adapter()
        with torch.no_grad(), ctx:
            logits = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            want = (
                torch.nn.functional.pad(
                    torch.log_softmax(logits.float(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0], (1, 0)
                )
                * mask
            )
            got = token_logprobs(peft, batch)
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_lean_distillation_loss_equals_the_full_logits_one(tiny_tokenizer, mode):
    """The distill stage's chunked loss (student and online-teacher heads on chunks of the loss positions)
    equals distill_loss on full [batch, seq, vocab] logits, value and gradient."""
    from posttrain.algos.kd import topk_teacher
    from posttrain.stages.distill import DistillConfig, distill_loss, lean_distill_loss

    student = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=3)
    teacher = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=4).eval()
    batch = _batch(len(tiny_tokenizer), seed=5)
    labels = torch.where(batch.response_mask.bool(), batch.input_ids, torch.full_like(batch.input_ids, -100))[:, 1:]
    of_mode = {"top_k": 8} if mode == "offline" else {"beta": 0.3}
    cfg = DistillConfig(mode=mode, alpha=0.5, temperature=1.5, **of_mode)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    topk = topk_teacher(t_logits, cfg.top_k, cfg.temperature) if mode == "offline" else (None, None)

    full = distill_loss(
        student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1],
        labels,
        cfg,
        None if mode == "offline" else t_logits,
        *topk,
    )
    full_grad = torch.autograd.grad(full[0], student.get_output_embeddings().weight)[0]
    lean = lean_distill_loss(
        student, batch.input_ids, batch.attention_mask, labels, cfg, None if mode == "offline" else teacher, *topk
    )
    lean_grad = torch.autograd.grad(lean[0], student.get_output_embeddings().weight)[0]
    for got, want in zip(lean, full):
        assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert torch.allclose(lean_grad, full_grad, atol=1e-5)


def test_heldout_metrics_equal_the_full_computation(tiny_tokenizer):
    from posttrain.algos.kd import forward_kl
    from posttrain.distill_cache import heldout_metrics, pad_batch

    student = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=6).eval()
    teacher = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=7).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, k in ((9, 4), (5, 6), (12, 2)):
        ids = torch.randint(6, len(tiny_tokenizer), (n + k,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * n + ids[n:]})
    got = heldout_metrics(student, teacher, examples, pad_id=0, batch_size=2)
    batch = pad_batch(examples, 0)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = torch.nn.functional.cross_entropy(s[mask], labels[mask]).item()
    assert got["tokens"] == int(mask.sum()) == 12
    assert got["nll"] == pytest.approx(round(nll, 4), abs=1e-4)
    assert got["kl_to_teacher"] == pytest.approx(round(forward_kl(s, t, mask).item(), 4), abs=1e-4)


@pytest.mark.parametrize("grouped", [True, False])
def test_tied_embedding_training_holds_one_dense_gradient(tiny_tokenizer, grouped, monkeypatch):
    """Gemma's head is its input embedding. Training through token_logprobs (the embedding's part of the
    gradient sparse, the head's dense part taking it in place) gives every parameter the gradient autograd's
    plain path gives, and a dense one. Shared-prompt and plain forwards alike."""
    from contextlib import nullcontext

    from posttrain import rollout

    model = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=1).train()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = (_grouped_batch if grouped else _batch)(len(tiny_tokenizer))
    assert (rollout.shared_prompt_plan(model, batch) is not None) == grouped
    weights = torch.randn(batch.input_ids.shape)

    def grads():
        model.zero_grad(set_to_none=True)
        (token_logprobs(model, batch, temperature=0.8) * weights).sum().backward()
        assert not model.get_input_embeddings().sparse  # restored after the forward
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    lean = grads()
    monkeypatch.setattr(rollout, "tied_head", lambda model, head: nullcontext(head))
    plain = grads()
    assert all(not g.is_sparse for g in lean.values())
    for name, got in lean.items():
        assert torch.allclose(got, plain[name], atol=1e-6, rtol=1e-5), name


def test_tied_embedding_gradient_is_dense_without_the_head(tiny_tokenizer):
    """If a loss reads the body but not the head, the weight's gradient is the embedding's sparse part
    alone: it is made dense, as the optimiser needs, and equals the plain gradient."""
    from posttrain.rollout import tied_head

    model = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=1).train()
    ids = torch.randint(6, len(tiny_tokenizer), (2, 5))
    weight = model.get_input_embeddings().weight
    with tied_head(model, model.get_output_embeddings()):
        model.model(input_ids=ids).last_hidden_state.sum().backward()
    lean = weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model.model(input_ids=ids).last_hidden_state.sum().backward()
    assert not lean.is_sparse and torch.allclose(lean, weight.grad, atol=1e-6)


def _peak_backward_mib(model, batch) -> float:
    """Peak RSS above the start of one backward pass through token_logprobs (Linux: VmHWM reset)."""

    def rss(key):
        return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))

    model.zero_grad(set_to_none=True)
    loss = token_logprobs(model, batch).sum()
    Path("/proc/self/clear_refs").write_text("5")
    start = rss("VmRSS:")
    loss.backward()
    return (rss("VmHWM:") - start) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
def test_tied_embedding_backward_holds_one_weight_sized_gradient(tiny_tokenizer, monkeypatch):
    """At Gemma's vocabulary 262144 (a 64 MiB embedding here) the backward pass of a training forward
    holds one weight-sized gradient, where autograd's plain path holds two (the head's and the
    embedding's, then adds them)."""
    from contextlib import nullcontext

    from posttrain import rollout

    model = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=1).train()
    model.resize_token_embeddings(262144, mean_resizing=False)
    weight_mib = model.get_input_embeddings().weight.numel() * 4 / 2**20
    batch = _grouped_batch(len(tiny_tokenizer), response_lengths=(1, 2))  # 9 tokens: 18 MiB of chunk buffers
    lean = _peak_backward_mib(model, batch)
    monkeypatch.setattr(rollout, "tied_head", lambda model, head: nullcontext(head))
    plain = _peak_backward_mib(model, batch)
    assert lean < 1.5 * weight_mib and plain > 1.8 * weight_mib, (lean, plain, weight_mib)


def _varied_batch(vocab: int, seed: int = 0):
    """Rows of very different lengths: two prompts with four samples each (1 to 20 tokens), and two rows of
    their own prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(6, vocab, (n,), generator=g).tolist()  # noqa: E731
    rows = [(p, ids(k)) for p in (ids(6), ids(4)) for k in (1, 20, 3, 12)] + [(ids(8), ids(2)), (ids(3), ids(18))]
    return pack_rollout([p for p, _ in rows], [Sample(text="", token_ids=c) for _, c in rows], pad_id=0)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize(
    "family,variant",
    [
        ("llama", None),
        ("gemma2", None),
        ("recurrent_gemma", None),
        ("gemma2", "vocab 262144"),
        ("llama", "checkpointing"),
    ],
)
def test_length_groups_score_as_one_batch_with_fewer_positions(tiny_tokenizer, family, variant, device, monkeypatch):
    """Rows scored in length groups (each cut to its own width, sharing prompts within a group where the
    family can) give the logprobs, entropies, raw logprobs and every parameter's gradient of the batch
    scored in one pass, while the body runs fewer positions. Gemma 2: soft-capped tied head; also at Gemma's
    vocabulary, where the head takes the groups' tokens in chunks of 64; and with gradient checkpointing
    (which turns prompt sharing off: the groups are by row length)."""
    from posttrain import rollout

    monkeypatch.setattr(rollout, "GROUP_MIN_POSITIONS", 0)  # tiny rows: take any split that saves positions
    model = build_tiny_model(ModelConfig(family=family, **TINY), tiny_tokenizer, seed=1).train()
    if variant == "vocab 262144":
        model.resize_token_embeddings(262144, mean_resizing=False)
    if variant == "checkpointing":
        enable_gradient_checkpointing(model, "gradient_checkpointing")
    model, batch = model.to(device), _varied_batch(len(tiny_tokenizer)).to(device)
    groups = rollout.length_groups(model.model, rollout.row_lengths(batch))
    assert groups is not None and len(groups) == rollout.GROUP_MAX
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(batch.input_ids.shape[0]))
    weights = torch.randn(batch.input_ids.shape).to(device)
    positions = []
    body = model.model
    body.register_forward_pre_hook(
        lambda _, args, kwargs: positions.append(kwargs["input_ids"].numel()), with_kwargs=True
    )

    def scored():
        positions.clear()
        logp, entropy, raw = token_logprobs(model, batch, temperature=0.8, with_entropy=True, with_raw=True)
        grads = torch.autograd.grad((logp * weights).sum(), list(model.parameters()))
        return (logp, entropy, raw), grads, sum(positions)

    grouped, grouped_grads, grouped_positions = scored()
    # Preference pairs carry no engine logprobs nor finished flags (dpo, the implicit reward model).
    pairs = dataclasses.replace(batch, engine_logprobs=None, finished=None)
    assert torch.equal(token_logprobs(model, pairs, temperature=0.8).detach(), grouped[0].detach())
    monkeypatch.setattr(rollout, "length_groups", lambda *_: None)
    whole, whole_grads, whole_positions = scored()
    assert grouped_positions < 0.7 * whole_positions, (grouped_positions, whole_positions)
    for got, want in zip(grouped, whole, strict=True):
        assert torch.allclose(got, want, atol=1e-5) and (got[batch.response_mask == 0] == 0).all()
    for got, want in zip(grouped_grads, whole_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("held", ["bf16", "autocast"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "recurrent_gemma"])
def test_length_groups_in_bf16_err_like_one_pass(tiny_tokenizer, family, held, device, monkeypatch):
    """bf16 as the stages run it: weights held in bf16 (the reference, DeepSpeed's bf16 module), or fp32
    master weights under autocast (one process). Length groups (with shared prompts where the family shares
    them) run other matrix shapes than one pass, so both are compared with the one pass of the same weights in
    fp32: the grouped error (values and the tied weight's gradient) is of the one bf16 pass's size. (The
    exactness checks are the fp32 tests above: a random tiny model is too insensitive to positions for bf16
    rounding to tell.)"""
    from contextlib import nullcontext

    from posttrain import rollout

    monkeypatch.setattr(rollout, "GROUP_MIN_POSITIONS", 0)
    dtype = "bfloat16" if held == "bf16" else "float32"
    model = build_tiny_model(ModelConfig(family=family, **TINY, dtype=dtype), tiny_tokenizer, seed=1).train()
    model = model.to(device)
    fp32 = copy.deepcopy(model).float()  # before any forward: RecurrentGemma then holds non-leaf state
    batch = _varied_batch(len(tiny_tokenizer)).to(device)
    weights = torch.randn(batch.input_ids.shape).to(device)
    passes = []
    model.model.register_forward_pre_hook(lambda *_: passes.append(1))

    def logp_and_grad(m, mixed: bool):
        passes.clear()
        with torch.autocast(device, dtype=torch.bfloat16) if mixed else nullcontext():
            logp = token_logprobs(m, batch, temperature=0.8)
        (grad,) = torch.autograd.grad((logp * weights).sum(), [m.get_input_embeddings().weight])
        return logp.float(), grad.float()

    grouped = logp_and_grad(model, held == "autocast")
    assert len(passes) > 1  # the rows were scored in groups
    monkeypatch.setattr(rollout, "length_groups", lambda *_: None)
    monkeypatch.setattr(rollout, "shared_prompt_plan", lambda *_: None)
    plain = logp_and_grad(model, held == "autocast")
    assert len(passes) == 1
    truth = logp_and_grad(fp32, False)
    for got, want, base in zip(grouped, truth, plain, strict=True):
        err, plain_err = (got - want).abs().max(), (base - want).abs().max()
        assert 0 < plain_err < 0.5 * want.abs().max()  # bf16 rounds, but not wildly
        assert err <= 2 * plain_err, (err, plain_err)
        assert (got - want).abs().mean() <= 1.25 * (base - want).abs().mean()


def test_length_groups_only_where_they_save_enough(tiny_tokenizer):
    """The default threshold: a further group must save 256 positions. Rows of one length, one row and ZeRO-3
    (its gathers are collectives: every rank must make the same body passes) take one pass."""
    from posttrain import rollout

    model = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=1)

    def groups(lengths):
        found = rollout.length_groups(model.model, torch.tensor(lengths))
        return found and [(rows.tolist(), width) for rows, width in found]

    assert groups([6] * 8) is None  # nothing to save
    assert groups([203]) is None
    assert groups([33] * 8 + [7] * 8) is None  # saves 208 of 528 positions
    assert groups([303] * 15 + [243] * 5) == [(list(range(15, 20)), 243), (list(range(15)), 303)]  # saves 300
    long_and_short = [13] * 14 + [203] * 4 + [13] * 14  # 32 x 203 positions in one pass, 4 x 203 + 28 x 13 in two
    assert groups(long_and_short) == [(list(range(14)) + list(range(18, 32)), 13), ([14, 15, 16, 17], 203)]
    two_rows = pack_rollout([[5, 6, 8]] * 2, [Sample("", [7] * 10), Sample("", [7])], 0)
    assert rollout.row_lengths(two_rows).tolist() == [13, 4]
    next(model.model.parameters()).ds_id = 0  # as DeepSpeed ZeRO-3 marks a partitioned weight
    assert rollout.length_groups(model.model, torch.tensor(long_and_short)) is None


def test_pair_batches_select_and_move_without_the_sampling_fields():
    """Preference pairs carry no engine logprobs or finished flags: selecting rows keeps them None."""
    from posttrain.rollout import RolloutBatch

    sampled = pack_rollout([[5, 6], [8]], [Sample("", [7, 9], [-0.5, -1.0]), Sample("", [4], [-2.0], finished=True)], 0)
    pairs = RolloutBatch(sampled.input_ids, sampled.attention_mask, sampled.response_mask, None, None)
    second = pairs.select(torch.tensor([1])).to(torch.device("cpu"))
    assert second.input_ids.tolist() == [[8, 4, 0, 0]] and second.response_mask.tolist() == [[0, 1, 0, 0]]
    assert second.engine_logprobs is None and second.finished is None
    assert sampled.select(torch.tensor([1])).engine_logprobs.tolist() == [[0.0, -2.0, 0.0, 0.0]]
    assert sampled.select(torch.tensor([1])).finished.tolist() == [True]


def test_split_by_length_is_the_cheapest_split():
    """Against every way of cutting the sorted rows into k groups (random lengths, ties included)."""
    import itertools
    import random

    from posttrain.rollout import split_by_length

    rng = random.Random(0)
    for _ in range(100):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 9))]
        ordered, n = sorted(lengths), len(lengths)
        cost = lambda cuts: sum((b - a) * ordered[b - 1] for a, b in zip((0, *cuts), (*cuts, n)))  # noqa: E731
        for k, (positions, cuts) in enumerate(split_by_length(lengths, 4), start=1):
            assert positions == min(cost(c) for c in itertools.combinations(range(1, n), k - 1))
            assert len(cuts) == k and cuts[-1] == n and cost(tuple(cuts[:-1])) == positions
