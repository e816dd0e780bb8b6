"""The pipeline runs end to end for every seed family; vLLM's missing RecurrentGemma support is a
clear error pointing at the HF backend, which is the configured alternative."""

import json

import pytest

from posttrain.pipeline import load_pipeline, run_pipeline

from .conftest import QUICKSTART_RECIPE, REPO, TINY, write_pipeline

pytestmark = pytest.mark.slow


def _body(family: str, backend: str) -> str:
    base = {**TINY, "family": family, "num_layers": 3 if family == "recurrent_gemma" else 2}
    sft = {"max_steps": 8, "batch_size": 16, "eval_samples": 8, "max_new_tokens": 8, "eval_steps": 100}
    ppo = {
        "updates": 2,
        "rollout_batch_size": 8,
        "mini_batch_size": 4,
        "eval_samples": 8,
        "sampling": {"backend": backend, "temperature": 1.0, "max_new_tokens": 8},
        "scoring": {"rules": [{"path": str(REPO / "reward" / "verifiers.py"), "function": "task_similarity"}]},
    }
    return (
        f"seed: 0\nstages: [synth, base, sft, ppo]\nsynth: {{recipe: {QUICKSTART_RECIPE}, num_train: 120, "
        f"num_eval: 16}}\nbase: {json.dumps(base)}\nsft: {json.dumps(sft)}\nppo: {json.dumps(ppo)}\n"
    )


@pytest.mark.parametrize(
    "family, backend", [("gemma", "vllm"), ("gemma2", "vllm"), ("llama", "vllm"), ("recurrent_gemma", "hf")]
)
def test_pipeline_runs_for_each_family(tmp_path, family, backend):
    summary = run_pipeline(load_pipeline(write_pipeline(tmp_path, _body(family, backend))))
    assert [s["status"] for s in summary.values()] == ["ran"] * 4
    assert summary["ppo"]["updates"] == 2
    assert (tmp_path / "run" / "ppo" / "model" / "model.safetensors").is_file()


def test_recurrent_gemma_with_vllm_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?i)recurrent.*backend: hf"):
        run_pipeline(load_pipeline(write_pipeline(tmp_path, _body("recurrent_gemma", "vllm"))))
