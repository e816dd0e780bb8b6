"""Generation backends: vLLM must sample exactly what HF would (tokens, stops, raw logprobs), and take
new policy weights in place.

Tiny Llama (tied embeddings) and Gemma 2 (soft-capping, sliding window) models are trained for a few
dozen steps on four conversations, so that greedy answers end their turn (with <end_of_turn>, or <eos>
for one of them) and `finished` means something. One vLLM engine per family, shared by the module.
"""

import importlib.util
import json
import os
import random
import sys

import pytest
import torch

from posttrain.engines import HFEngine, SamplingConfig, chat_prompt_ids, make_engine
from posttrain.engines.vllm import VLLMEngine, _prepare_environment
from posttrain.models import ModelConfig, build_tiny_model, save_model_dir, stop_token_ids, train_tokenizer
from posttrain.tasks import TASKS, make_example

from .test_devices import CPU_AND_CUDA

torch.set_num_threads(1)
CPU = torch.device("cpu")

LOGPROB_ATOL = 2e-5
"""fp32, same weights: measured max |vLLM - HF forward| 6e-6 (Gemma 2, 150-token prompt)."""
requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")

# (question, answer, stop token name) the fixture models learn by heart
TRAINED = [
    ("What is 2 + 3?", "5", "<end_of_turn>"),
    ("Say bye.", "bye", "<eos>"),
    ("Reverse: a, b, c", "c, b, a", "<end_of_turn>"),
    ("Tell me a long story.", "once upon a time there was a cat and a dog and a bird", "<end_of_turn>"),
]
LONG_QUESTION = "Tell me a long story. " + " ".join(["cat dog sun moon tree"] * 8)  # ~150 tokens
PROMPTS = [[{"role": "user", "content": q}] for q, _, _ in TRAINED] + [
    [{"role": "user", "content": "Sort these numbers: 3, 1, 2"}],
    [{"role": "user", "content": LONG_QUESTION}],
]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [json.dumps(make_example(rng.choice(sorted(TASKS)), rng)) for _ in range(300)]
    return train_tokenizer(texts + [q + " " + a for q, a, _ in TRAINED], vocab_size=400)


def train_on_answers(model, tokenizer, steps: int = 80) -> None:
    """Teach the model the TRAINED answers (completion tokens only), enough for greedy to reproduce them."""
    examples = []
    for question, answer, stop in TRAINED:
        prompt = chat_prompt_ids(tokenizer, user(question))
        completion = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(stop)]
        examples.append((prompt, completion))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = 0.0
        for prompt, completion in examples:
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(completion))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def tiny_config(family: str) -> ModelConfig:
    return ModelConfig(
        family=family,
        hidden_size=64,
        num_layers=2 if family != "recurrent_gemma" else 3,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        intermediate_size=128,
        sliding_window=64,
    )


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tokenizer, tmp_path_factory):
    model = build_tiny_model(tiny_config(family), tokenizer, seed=0)
    train_on_answers(model, tokenizer)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp(family) / "model")


def load_reference(model_dir):
    """The HF model of `model_dir`, with eager attention: transformers' SDPA path drops Gemma 2's
    attention soft-capping, eager applies it (as vLLM does)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def engine(model_dir, tokenizer):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed")
    eng = VLLMEngine(model_dir, tokenizer=tokenizer, seed=0)
    yield eng
    eng.close()


@torch.no_grad()
def forward_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """Teacher-forced log-softmax (T=1) of each completion token given everything before it."""
    logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0, len(prompt_ids) - 1 : -1]
    return logits.float().log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def max_logprob_error(model, tokenizer, prompts, results) -> float:
    errors = [
        (forward_logprobs(model, chat_prompt_ids(tokenizer, p), s.token_ids) - torch.tensor(s.logprobs)).abs().max()
        for p, samples in zip(prompts, results)
        for s in samples
    ]
    return max(float(e) for e in errors)


# ----------------------------------------------------------------------------------------------
# Same weights, same answers


@requires_vllm
def test_greedy_tokens_and_finished_match_hf(engine, model_dir, tokenizer):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)
    vllm_out = engine.generate(PROMPTS, greedy)
    hf_out = HFEngine(load_reference(model_dir), tokenizer).generate(PROMPTS, greedy)

    assert [s[0].token_ids for s in vllm_out] == [s[0].token_ids for s in hf_out]
    assert [s[0].finished for s in vllm_out] == [s[0].finished for s in hf_out]
    assert [s[0].text for s in vllm_out] == [s[0].text for s in hf_out]
    # the comparison covers both outcomes: answers that end their turn and ones cut at max_new_tokens
    assert {s[0].finished for s in vllm_out} == {True, False}
    assert vllm_out[0][0].text == "5" and vllm_out[2][0].text == "c, b, a"


@requires_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logprobs_are_raw_and_match_hf_forward(engine, model_dir, tokenizer, temperature):
    # At T=0.5 the sampling distribution is sharper, but the reported logprobs stay raw (T=1), as HF's.
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=12, n=2, seed=3)
    reference = load_reference(model_dir)
    vllm_out = engine.generate(PROMPTS, sampling)
    assert all(len(s.logprobs) == len(s.token_ids) > 0 for samples in vllm_out for s in samples)
    assert max_logprob_error(reference, tokenizer, PROMPTS, vllm_out) < LOGPROB_ATOL
    # HFEngine's logprobs (asked for) mean the same thing
    hf_out = HFEngine(reference, tokenizer).generate(PROMPTS, sampling.model_copy(update={"logprobs": True}))
    assert max_logprob_error(reference, tokenizer, PROMPTS, hf_out) < LOGPROB_ATOL


@requires_vllm
def test_n_samples_per_prompt_reproducible_with_seed(engine):
    prompts = [user("Sort these numbers: 3, 1, 2"), user(LONG_QUESTION), user("Sort these numbers: 3, 1, 2")]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, n=4, seed=11)
    first = engine.generate(prompts, sampling)
    again = engine.generate(prompts, sampling)
    other_seed = engine.generate(prompts, sampling.model_copy(update={"seed": 12}))

    assert [len(samples) for samples in first] == [4, 4, 4]
    ids = lambda out: [[s.token_ids for s in samples] for samples in out]  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other_seed)
    assert all(1 <= len(s.token_ids) <= 8 for samples in first for s in samples)
    assert len({tuple(t) for t in ids(first)[0]}) > 1, "the n samples of one prompt should differ"
    # the same prompt twice in a batch is sampled independently, not with the same seeds
    assert ids(first)[0] != ids(first)[2]
    # greedy with n > 1 (vLLM itself refuses it): n copies of the greedy answer, as HF returns
    greedy = engine.generate(prompts[:1], SamplingConfig(temperature=0.0, max_new_tokens=8, n=3))
    single = engine.generate(prompts[:1], SamplingConfig(temperature=0.0, max_new_tokens=8))
    assert [s.token_ids for s in greedy[0]] == [single[0][0].token_ids] * 3


@requires_vllm
def test_stops_at_end_of_turn_and_eos(engine, tokenizer):
    eot, eos = tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id
    greedy = engine.generate([user("What is 2 + 3?"), user("Say bye.")], SamplingConfig(max_new_tokens=20))
    five, bye = greedy[0][0], greedy[1][0]
    assert five.token_ids == tokenizer.encode("5", add_special_tokens=False) + [eot]
    assert (five.text, five.finished) == ("5", True)
    assert bye.token_ids == tokenizer.encode("bye", add_special_tokens=False) + [eos]
    assert (bye.text, bye.finished) == ("bye", True)

    stops = set(stop_token_ids(tokenizer))
    sampled = engine.generate(PROMPTS, SamplingConfig(temperature=1.0, max_new_tokens=24, n=4, seed=5))
    samples = [s for group in sampled for s in group]
    assert any(s.finished for s in samples)
    for s in samples:
        # a stop token can only be the last token; nothing is generated or decoded after it
        assert not stops & set(s.token_ids[:-1])
        assert s.finished == (s.token_ids[-1] in stops)
        assert s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True)
        assert len(s.token_ids) == 24 or s.finished


# ----------------------------------------------------------------------------------------------
# Weight sync


@requires_vllm
def test_weight_sync_serves_the_new_weights(engine, model_dir, tokenizer):
    prompts = [user("What is 2 + 3?"), user(LONG_QUESTION)]
    assert len(chat_prompt_ids(tokenizer, prompts[1])) >= 128  # long enough to hit the prefix cache
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    old_model = load_reference(model_dir)
    before = engine.generate(prompts, greedy)
    engine.generate(prompts, greedy)  # the prompts' KV is now cached, computed with the old weights

    new_model = load_reference(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    try:
        seconds = engine.load_weights(new_model.state_dict().items())
        assert 0 < seconds < 30
        after = engine.generate(prompts, greedy)
        assert max_logprob_error(new_model, tokenizer, prompts, after) < LOGPROB_ATOL
        assert max_logprob_error(old_model, tokenizer, prompts, after) > 1e-3
        hf_after = HFEngine(new_model, tokenizer).generate(prompts, greedy)
        assert [s[0].token_ids for s in after] == [s[0].token_ids for s in hf_after]

        # the engine holds a copy: changing the pushed tensors in place does not reach it
        with torch.no_grad():
            for p in new_model.parameters():
                p.mul_(0.5)
        again = engine.generate(prompts, greedy)
        assert [s[0].logprobs for s in again] == [s[0].logprobs for s in after]
    finally:
        engine.load_weights_from_dir(model_dir)
    restored = engine.generate(prompts, greedy)
    assert [s[0].token_ids for s in restored] == [s[0].token_ids for s in before]
    assert max_logprob_error(old_model, tokenizer, prompts, restored) < LOGPROB_ATOL


@requires_vllm
def test_load_weights_rejects_incomplete_or_foreign_tensors(engine, model_dir, tokenizer):
    state = load_reference(model_dir).state_dict()
    before = engine.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=4))
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        engine.load_weights(missing.items())
    with pytest.raises(ValueError, match=r"unexpected \['value_head.weight'\]"):
        engine.load_weights([*state.items(), ("value_head.weight", torch.zeros(1, 64))])
    after = engine.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=4))
    assert [s[0].logprobs for s in after] == [s[0].logprobs for s in before]  # nothing was pushed


# ----------------------------------------------------------------------------------------------
# Unsupported models, start-up errors, the factory


@pytest.fixture(scope="module")
def recurrent_gemma_dir(tokenizer, tmp_path_factory):
    model = build_tiny_model(tiny_config("recurrent_gemma"), tokenizer, seed=0)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("rg") / "model")


def test_recurrent_gemma_refused_by_vllm_generated_by_hf(recurrent_gemma_dir, tokenizer):
    with pytest.raises(RuntimeError) as err:
        VLLMEngine(recurrent_gemma_dir)
    message = str(err.value)
    assert str(recurrent_gemma_dir) in message and "RecurrentGemma" in message and "backend: hf" in message
    with pytest.raises(RuntimeError, match="backend: hf"):
        make_engine(str(recurrent_gemma_dir), SamplingConfig(backend="vllm"), CPU)

    hf = make_engine(str(recurrent_gemma_dir), SamplingConfig(backend="hf"), CPU)
    assert isinstance(hf, HFEngine)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6, n=2, seed=0, logprobs=True)
    out = hf.generate([user("What is 2 + 3?")], sampling)
    assert len(out) == 1 and len(out[0]) == 2
    assert all(len(s.token_ids) == len(s.logprobs) > 0 for s in out[0])
    unasked = hf.generate([user("What is 2 + 3?")], sampling.model_copy(update={"logprobs": False}))
    assert [s.token_ids for s in unasked[0]] == [s.token_ids for s in out[0]] and not unasked[0][0].logprobs
    assert max_logprob_error(hf.model, tokenizer, [user("What is 2 + 3?")], out) < LOGPROB_ATOL


@requires_vllm
def test_engine_start_failure_names_model_and_architecture(family, model_dir):
    # max_model_len beyond the model's positions: vLLM refuses while building its config
    with pytest.raises(RuntimeError) as err:
        VLLMEngine(model_dir, max_model_len=100_000)
    message = str(err.value)
    assert str(model_dir) in message and {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM"}[family] in message


def test_missing_vllm_is_a_clear_error(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(RuntimeError, match="vLLM is not installed.*backend: hf") as err:
        VLLMEngine(model_dir)
    assert str(model_dir) in str(err.value)


def test_make_engine_hf_uses_the_given_model_and_rejects_unknown_backends(recurrent_gemma_dir, tokenizer):
    from pydantic import ValidationError

    from posttrain.engines import VLLMOptions

    model = build_tiny_model(tiny_config("llama"), tokenizer, seed=1)
    engine = make_engine(str(recurrent_gemma_dir), SamplingConfig(), CPU, model=model, tokenizer=tokenizer)
    assert engine.model is model and engine.tokenizer is tokenizer
    with pytest.raises(ValidationError, match="backend"):
        SamplingConfig(backend="tgi")
    with pytest.raises(ValueError, match="no vLLM options"):
        make_engine(str(recurrent_gemma_dir), SamplingConfig(), CPU, vllm=VLLMOptions(kv_cache_gib=2))
    with pytest.raises(ValidationError, match="extra"):
        VLLMOptions(tensor_paralel_size=2)  # a typo is refused, not passed on


def test_vllm_environment_keeps_user_values(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in ("VLLM_TARGET_DEVICE", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    _prepare_environment(kv_cache_gib=None)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3" and os.environ["HF_HUB_OFFLINE"] == "0"
    assert os.environ["VLLM_TARGET_DEVICE"] == "cpu" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    _prepare_environment(kv_cache_gib=2)  # an explicit argument is the caller's request
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"


@requires_vllm
def test_engine_records_thread_count(engine):
    # vLLM turns torch.set_num_threads into a no-op; the count in force at start-up is recorded
    assert engine.num_threads == 1 == torch.get_num_threads()


@pytest.mark.parametrize("family", ["llama", "gemma2", "recurrent_gemma"])
def test_hf_engine_leaves_the_model_trainable(tiny_tokenizer, family):
    """HF generation runs under inference mode; the live policy it samples from must train right after
    (no parameter or buffer turned into an inference tensor), and sampling stays seeded."""
    from posttrain.rollout import pack_rollout, token_logprobs

    from .conftest import TINY

    model = build_tiny_model(ModelConfig(family=family, **TINY), tiny_tokenizer, seed=0)
    engine = HFEngine(model, tiny_tokenizer)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6, n=2, seed=3)
    groups = engine.generate(PROMPTS[:2], sampling)
    assert [[s.token_ids for s in g] for g in groups] == [
        [s.token_ids for s in g] for g in engine.generate(PROMPTS[:2], sampling)
    ]
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    prompts = [chat_prompt_ids(tiny_tokenizer, p) for p in PROMPTS[:2] for _ in range(2)]
    batch = pack_rollout(prompts, [s for g in groups for s in g], tiny_tokenizer.pad_token_id)
    model.train()
    token_logprobs(model, batch).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family,max_new_tokens", [("llama", 8), ("gemma2", 8), ("gemma2", 1)])
def test_hf_engine_prefills_each_prompt_once_and_samples_the_same(tiny_tokenizer, family, max_new_tokens, monkeypatch):
    """n samples per prompt: each prompt is prefilled once, its cache repeated for the samples and the first
    token drawn from its logits, instead of generate running every copy through the model: one forward pass
    per new token in all. Same seed, same tokens and logprobs as the copies path."""
    from posttrain.engines import hf

    from .conftest import TINY

    model = build_tiny_model(ModelConfig(family=family, **TINY), tiny_tokenizer, seed=0)
    engine = HFEngine(model, tiny_tokenizer)
    prompts = PROMPTS[:5]  # prompt lengths differ: left padding in the shared cache
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=max_new_tokens, n=3, seed=5, logprobs=True)
    prefilled, forwards = [], []
    prompt_cache = HFEngine._prompt_cache
    monkeypatch.setattr(
        HFEngine,
        "_prompt_cache",
        lambda self, ids, *rest: prefilled.append(ids.shape[0]) or prompt_cache(self, ids, *rest),
    )
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    shared = engine.generate(prompts, sampling)
    hook.remove()
    assert prefilled == [len(prompts)] and len(forwards) == max_new_tokens
    monkeypatch.setattr(hf, "prompt_cache_supported", lambda *_: False)
    copies = engine.generate(prompts, sampling)
    assert prefilled == [len(prompts)]
    assert any(len(s.token_ids) == max_new_tokens for g in shared for s in g)
    for got, want in zip([s for g in shared for s in g], [s for g in copies for s in g], strict=True):
        assert got.token_ids == want.token_ids and got.finished == want.finished
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5)


def test_hf_engine_sample_ending_at_its_first_token(tiny_tokenizer, monkeypatch):
    """The shared-prompt path draws the first token itself; a sample whose first token ends the turn is that
    one token, finished, while the other samples run on."""
    from posttrain.engines import hf

    from .conftest import TINY

    model = build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=0)
    stop = stop_token_ids(tiny_tokenizer)[-1]
    draw = hf.draw_tokens
    monkeypatch.setattr(hf, "draw_tokens", lambda *a: torch.cat([torch.tensor([stop]), draw(*a)[1:]]))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6, n=2, seed=1, logprobs=True)
    (first, second), *_ = HFEngine(model, tiny_tokenizer).generate(PROMPTS[:2], sampling)
    assert first.token_ids == [stop] and first.finished and len(first.logprobs) == 1 and first.logprobs[0] < 0
    assert len(second.token_ids) > 1 and len(second.logprobs) == len(second.token_ids)  # seeded: it runs on


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_draw_tokens_follows_the_sampling_distribution(temperature, top_p, device):
    """The HF engine's inverse-CDF draw: token frequencies over 200k rows are softmax(logits / T), renormalised
    over the nucleus when top-p < 1 (here the three likeliest tokens, 0.563 + 0.207 + 0.126 of the mass, are
    the smallest set reaching 0.8); a token of probability below 1e-14 and top-p's cut tokens never come up."""
    from posttrain.engines.hf import draw_tokens

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0, 0.5])
    rows = 200_000
    drawn = draw_tokens(logits.repeat(rows, 1).to(device), temperature, top_p)
    assert drawn.device.type == device
    frequencies = torch.bincount(drawn.cpu(), minlength=len(logits)) / rows
    expected = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        expected[[2, 3, 4]] = 0.0
        expected /= expected.sum()
    assert torch.allclose(frequencies, expected, atol=5e-3), (frequencies, expected)
    assert frequencies[4] == 0 and (top_p == 1.0 or frequencies[[2, 3]].sum() == 0)
