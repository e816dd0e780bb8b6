"""vLLM colocated with torchrun ranks (external launcher), on CPU exactly as on GPUs: PPO as 2 ranks with
one engine per rank (TP=1) and one engine spanning both ranks (TP=2), weights pushed after every update;
and a generating stage sharing its prompts over 2 ranks, building one engine per model in turn."""

import importlib.util
import json

import pytest
import torch

from posttrain.data import write_jsonl
from posttrain.pipeline import load_pipeline, run_pipeline

from .conftest import make_rows, write_pipeline

requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
VLLM_SAMPLING = {"backend": "vllm", "temperature": 1.0, "max_new_tokens": 12}
LENGTH_REWARD = "def longer(prompts, completions, **_):\n    return [len(c) / 10.0 for c in completions]\n"


def _ppo_pipeline(tmp_path, model_dir, tp: int, **extra) -> str:
    write_jsonl(tmp_path / "train.jsonl", make_rows(64, seed=1))
    (tmp_path / "reward.py").write_text(LENGTH_REWARD)
    ppo = {
        "model": str(model_dir),
        "train_data": str(tmp_path / "train.jsonl"),
        "eval_samples": 0,
        "sampling": {**VLLM_SAMPLING, "tensor_parallel_size": tp},
        "scoring": {"rules": [{"path": str(tmp_path / "reward.py"), "function": "longer"}]},
        "updates": 3,
        "rollout_batch_size": 8,
        "mini_batch_size": 8,
        "learning_rate": 1e-3,
        "save_every": 10,
        "distributed": {"num_processes": 2, "zero_stage": 2},
        **extra,
    }
    return write_pipeline(tmp_path, f"seed: 0\nthreads: 1\nstages: [ppo]\nppo: {json.dumps(ppo)}\n")


@requires_vllm
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_ppo_two_ranks_with_colocated_vllm_engines(tmp_path, tiny_model_dir, tp):
    """TP=1: two engines, each rank samples its own prompts; TP=2: one engine over both ranks, which pool
    their prompts. Either way the engine serves the weights pushed after each update: its logprobs stay
    within 1e-3 of the trainer's for all 3 updates. TP=1 runs GRPO with dynamic sampling: its group counts
    are both ranks' groups, summed."""
    grpo = {"advantage": "grpo", "dynamic_sampling": True, "sampling": {**VLLM_SAMPLING, "n": 2}} if tp == 1 else {}
    run_pipeline(load_pipeline(_ppo_pipeline(tmp_path, tiny_model_dir, tp, **grpo)))
    stage_dir = tmp_path / "run" / "ppo"
    history = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["update"] for h in history] == [1, 2, 3]
    assert all(0 < h["logprob_gap"] < 1e-3 for h in history), [h["logprob_gap"] for h in history]
    assert history[-1]["kl"] != 0.0 and all(h["time/sync"] > 0 for h in history)
    if tp == 1:  # 8 groups per rank at least
        assert all(isinstance(h["dynamic/groups_sampled"], int) and h["dynamic/groups_sampled"] >= 16 for h in history)
    from safetensors.torch import load_file

    trained = load_file(stage_dir / "model" / "model.safetensors")
    init = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(trained[k], init[k]) for k in init)


def _eval_pipeline(tmp_path, models: dict, backend: str, processes: int, tp: int) -> str:
    write_jsonl(tmp_path / "eval.jsonl", make_rows(12, seed=5))
    ev = {
        "models": {name: str(path) for name, path in models.items()},
        "eval_data": str(tmp_path / "eval.jsonl"),
        "sampling": {"backend": backend, "max_new_tokens": 10, "tensor_parallel_size": tp},
        "distributed": {"num_processes": processes},
    }
    return write_pipeline(tmp_path, f"seed: 0\nthreads: 1\nstages: [eval]\neval: {json.dumps(ev)}\n")


def _answers(run_dir, name: str = "m") -> list:
    rows = (run_dir / "eval" / "completions.jsonl").read_text().splitlines()
    return [json.loads(r)["completions"][name] for r in rows]


@pytest.mark.slow
def test_eval_shares_prompts_over_two_ranks(tmp_path, tiny_model_dir):
    """Greedy answers from 2 ranks (each rank answering half with HF) are the answers one process gives, in
    the same order; rank 0 writes the results. (vLLM over 2 ranks: the two-models test below.)"""
    single = tmp_path / "one"
    single.mkdir()
    run_pipeline(load_pipeline(_eval_pipeline(single, {"m": tiny_model_dir}, "hf", 1, 1)))
    shared = tmp_path / "two"
    shared.mkdir()
    run_pipeline(load_pipeline(_eval_pipeline(shared, {"m": tiny_model_dir}, "hf", 2, 1)))
    assert _answers(shared / "run") == _answers(single / "run")
    launch = json.loads((shared / "run" / "eval" / "launch.json").read_text())
    assert launch["config"]["distributed"]["num_processes"] == 2


@pytest.fixture(scope="module")
def two_models_and_answers(tmp_path_factory, tiny_tokenizer):
    """Two tiny Gemma 2 models with different weights, and their greedy answers from one process (HF).
    (Gemma 2, the family of configs/gemma2-2b-gpu.yaml: the tiny random Llama answers every prompt with
    the same newlines, which could not tell two models apart.)"""
    from posttrain.models import ModelConfig, build_tiny_model, save_model_dir

    from .conftest import TINY

    out = tmp_path_factory.mktemp("two_models")
    models = {
        name: save_model_dir(
            build_tiny_model(ModelConfig(family="gemma2", **TINY), tiny_tokenizer, seed=seed),
            tiny_tokenizer,
            out / name,
        )
        for name, seed in (("a", 0), ("b", 1))
    }
    run_pipeline(load_pipeline(_eval_pipeline(out, models, "hf", 1, 1)))
    answers = {name: _answers(out / "run", name) for name in models}
    assert answers["a"] != answers["b"]  # else the check below could not tell the models apart
    return models, answers


@requires_vllm
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_eval_two_models_one_after_another_on_two_ranks(tmp_path, two_models_and_answers, tp):
    """Both ranks build a vLLM engine for b after closing a's (TP=1: one engine per rank, each answering
    half; TP=2: one engine across both). Closing an engine must leave the launcher's process group standing:
    vLLM's own teardown destroyed it, and b's engine then failed on rank 1 (TP=1 always; TP=2 when a stale
    rendezvous address won the race). Each model's answers are its one-process answers."""
    models, answers = two_models_and_answers
    run_pipeline(load_pipeline(_eval_pipeline(tmp_path, models, "vllm", 2, tp)))
    assert {name: _answers(tmp_path / "run", name) for name in models} == answers
