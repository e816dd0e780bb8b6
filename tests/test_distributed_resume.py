"""Slow end-to-end checks: SFT as 2 DeepSpeed ranks (ZeRO-2, ZeRO-3), and SIGKILL-then-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from posttrain.manifest import read_manifest
from posttrain.pipeline import load_pipeline, run_pipeline

from .conftest import QUICKSTART_RECIPE, TINY, write_pipeline

pytestmark = pytest.mark.slow


def _body(sft: dict, base=None) -> str:
    base = base or {**TINY, "family": "llama"}
    return (
        f"seed: 0\nthreads: 1\nstages: [synth, base, sft]\n"
        f"synth: {{recipe: {QUICKSTART_RECIPE}, num_train: 300, num_eval: 30}}\n"
        f"base: {json.dumps(base)}\nsft: {json.dumps(sft)}\n"
    )


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sft_under_deepspeed_two_processes(tmp_path, zero_stage):
    sft = {
        "max_steps": 16,
        "batch_size": 8,
        "eval_steps": 8,
        "save_steps": 8,
        "eval_samples": 0,
        "learning_rate": 3e-3,
        "distributed": {"num_processes": 2, "zero_stage": zero_stage},
    }
    summary = run_pipeline(load_pipeline(write_pipeline(tmp_path, _body(sft))))
    m = summary["sft"]
    assert m["processes"] == 2 and m["deepspeed_zero_stage"] == zero_stage
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.5
    out = tmp_path / "run" / "sft" / "model"
    trained = load_file(out / "model.safetensors")
    base = load_file(tmp_path / "run" / "base" / "model" / "model.safetensors")
    assert not torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert set(trained) == set(base)  # ZeRO-2's save wrote the tied head again; a merge refused the extra tensor
    from posttrain.models import load_model

    model = load_model(out, device="cpu")  # a normal, loadable checkpoint (ZeRO-3: gathered on save)
    assert model(torch.tensor([[2, 4, 7]])).logits.shape[-1] == base["model.embed_tokens.weight"].shape[0]


def test_sigkill_during_sft_then_resume(tmp_path):
    base = {**TINY, "family": "llama", "hidden_size": 128, "num_layers": 4, "intermediate_size": 384}
    sft = {
        "max_steps": 150,
        "batch_size": 32,
        "save_steps": 10,
        "eval_steps": 1000,
        "eval_samples": 0,
        "learning_rate": 1e-3,
    }
    path = write_pipeline(tmp_path, _body(sft, base))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "posttrain.cli", "run", path]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    ckpt = run / "sft" / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the deadline"
    assert read_manifest(run / "sft")["status"] == "running"
    assert not (run / "sft" / "model").exists()  # nothing that looks finished

    summary = run_pipeline(load_pipeline(path))
    assert (summary["synth"]["status"], summary["base"]["status"], summary["sft"]["status"]) == (
        "skipped",
        "skipped",
        "ran",
    )
    assert summary["sft"]["steps"] == 150
    assert summary["sft"]["resumed_from_step"] >= 10  # continued from the checkpoint, not from step 0
    assert read_manifest(run / "sft")["status"] == "complete"
