"""vLLM colocated with torchrun ranks (external launcher), on CPU exactly as on GPUs: PPO as 2 ranks with
one engine per rank (TP=1) and one engine spanning both ranks (TP=2), weights pushed after every update;
and a generating stage sharing its prompts over 2 ranks."""

import importlib.util
import json

import pytest
import torch

from posttrain.data import write_jsonl
from posttrain.pipeline import load_pipeline, run_pipeline

from .conftest import make_rows, write_pipeline

requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
LENGTH_REWARD = "def longer(prompts, completions, **_):\n    return [len(c) / 10.0 for c in completions]\n"


def _ppo_pipeline(tmp_path, model_dir, tp: int, **extra) -> str:
    write_jsonl(tmp_path / "train.jsonl", make_rows(64, seed=1))
    (tmp_path / "reward.py").write_text(LENGTH_REWARD)
    ppo = {
        "model": str(model_dir),
        "train_data": str(tmp_path / "train.jsonl"),
        "eval_samples": 0,
        "sampling": {"backend": "vllm", "temperature": 1.0, "max_new_tokens": 12, "tensor_parallel_size": tp},
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
    within 1e-3 of the trainer's for all 3 updates."""
    run_pipeline(load_pipeline(_ppo_pipeline(tmp_path, tiny_model_dir, tp)))
    stage_dir = tmp_path / "run" / "ppo"
    history = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["update"] for h in history] == [1, 2, 3]
    assert all(0 < h["logprob_gap"] < 1e-3 for h in history), [h["logprob_gap"] for h in history]
    assert history[-1]["kl"] != 0.0 and all(h["time/sync"] > 0 for h in history)
    from safetensors.torch import load_file

    trained = load_file(stage_dir / "model" / "model.safetensors")
    init = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(trained[k], init[k]) for k in init)


def _eval_pipeline(tmp_path, model_dir, backend: str, processes: int, tp: int) -> str:
    write_jsonl(tmp_path / "eval.jsonl", make_rows(12, seed=5))
    ev = {
        "models": {"m": str(model_dir)},
        "eval_data": str(tmp_path / "eval.jsonl"),
        "sampling": {"backend": backend, "max_new_tokens": 10, "tensor_parallel_size": tp},
        "distributed": {"num_processes": processes},
    }
    return write_pipeline(tmp_path, f"seed: 0\nthreads: 1\nstages: [eval]\neval: {json.dumps(ev)}\n")


def _answers(run_dir) -> list:
    rows = (run_dir / "eval" / "completions.jsonl").read_text().splitlines()
    return [json.loads(r)["completions"]["m"] for r in rows]


@requires_vllm
@pytest.mark.slow
@pytest.mark.parametrize("backend,tp", [("vllm", 2), ("hf", 1)])
def test_eval_shares_prompts_over_two_ranks(tmp_path, tiny_model_dir, backend, tp):
    """Greedy answers from 2 ranks (one TP=2 vLLM engine across both, or each rank answering half with HF)
    are the answers one process gives, in the same order; rank 0 writes the results."""
    single = tmp_path / "one"
    single.mkdir()
    run_pipeline(load_pipeline(_eval_pipeline(single, tiny_model_dir, "hf", 1, 1)))
    shared = tmp_path / "two"
    shared.mkdir()
    run_pipeline(load_pipeline(_eval_pipeline(shared, tiny_model_dir, backend, 2, tp)))
    assert _answers(shared / "run") == _answers(single / "run")
    launch = json.loads((shared / "run" / "eval" / "launch.json").read_text())
    assert launch["config"]["distributed"]["num_processes"] == 2
