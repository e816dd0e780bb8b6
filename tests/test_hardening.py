"""Bad input gets a clear error before any work; broken training stops without marking anything complete;
resumed runs report the uninterrupted run's metrics; one run per run directory."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from posttrain.checkpoint import TrainingGuard
from posttrain.config import ConfigError
from posttrain.data import write_jsonl
from posttrain.manifest import LOCK, read_manifest
from posttrain.paths import check_model_dir
from posttrain.pipeline import load_pipeline, run_pipeline

from .conftest import make_rows, write_pipeline


def test_model_directory_problems_are_named(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json.*an empty directory"):
        check_model_dir(empty)
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a model directory, found a file of 1 bytes"):
        check_model_dir(a_file)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="found pytorch_model.bin: pickle weights are never loaded"):
        check_model_dir(pickled)
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors weights; found a directory holding \['config.json'\]"):
        check_model_dir(pickled)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in tiny_model_dir.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        check_model_dir(truncated)


def test_config_time_errors_name_the_key(tmp_path, tiny_model_dir):
    (tmp_path / "f.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"sft.model: .*expected a model directory, found a file"):
        load_pipeline(write_pipeline(tmp_path, f"stages: [sft]\nsft: {{model: {tmp_path / 'f.txt'}}}\n"))
    with pytest.raises(ConfigError, match=r"sft.learning_rate: Input should be a finite number"):
        load_pipeline(write_pipeline(tmp_path, "stages: [sft]\nsft: {learning_rate: .inf}\n"))
    with pytest.raises(ConfigError, match=r"ppo.kl_coef: Input should be a finite number"):
        load_pipeline(write_pipeline(tmp_path, "stages: [ppo]\nppo: {kl_coef: .nan}\n"))
    (tmp_path / "file").write_text("")
    cfg = load_pipeline(write_pipeline(tmp_path, "stages: [sft]\n"), [f"run_dir={tmp_path / 'file' / 'run'}"])
    with pytest.raises(ConfigError, match=r"run_dir: .*cannot be a directory: .*file is a file"):
        run_pipeline(cfg)


def _sft(tmp_path, model_dir, **sft) -> str:
    write_jsonl(tmp_path / "train.jsonl", make_rows(64, seed=1))
    sft = {
        "model": str(model_dir),
        "train_data": str(tmp_path / "train.jsonl"),
        "max_steps": 8,
        "batch_size": 8,
        "save_steps": 4,
        "logging_steps": 3,
        "eval_samples": 0,
        "learning_rate": 1e-3,
        **sft,
    }
    return write_pipeline(tmp_path, f"seed: 0\nstages: [sft]\nsft: {json.dumps(sft)}\n")


def test_nan_training_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, tiny_model_dir):
    path = _sft(tmp_path, tiny_model_dir, learning_rate=1e25)  # finite, but the weights overflow at once
    with pytest.raises(FloatingPointError, match=r"sft: the training loss is (nan|inf) at step \d"):
        run_pipeline(load_pipeline(path))
    stage = tmp_path / "run" / "sft"
    assert read_manifest(stage)["status"] == "failed" and not (stage / "model").exists()


def test_a_resumed_run_reports_the_uninterrupted_training_loss(tmp_path, tiny_model_dir, monkeypatch):
    write_jsonl(tmp_path / "eval.jsonl", make_rows(8, seed=2))
    held_out = {"eval_data": str(tmp_path / "eval.jsonl"), "eval_steps": 4}
    whole = run_pipeline(load_pipeline(_sft(tmp_path / "a", tiny_model_dir, **held_out)))["sft"]
    real = TrainingGuard.on_step_end

    def crash_at_6(self, args, state, control, **kw):
        if state.global_step == 6:
            raise KeyboardInterrupt("simulated kill")
        return real(self, args, state, control, **kw)

    monkeypatch.setattr(TrainingGuard, "on_step_end", crash_at_6)
    path = _sft(tmp_path / "b", tiny_model_dir, **held_out)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline(path))
    assert read_manifest(tmp_path / "b" / "run" / "sft")["status"] == "interrupted"  # not "failed"
    monkeypatch.setattr(TrainingGuard, "on_step_end", real)
    resumed = run_pipeline(load_pipeline(path))["sft"]
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == whole["steps"] == 8
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=2e-4)
    # ... and so do metrics.json's log history (and the trackers, which see the same logs)
    history = json.loads((tmp_path / "b" / "run" / "sft" / "metrics.json").read_text())["log_history"]
    assert [h["train_loss"] for h in history if "train_loss" in h] == [pytest.approx(whole["train_loss"], abs=2e-4)]
    evals = json.loads((tmp_path / "a" / "run" / "sft" / "metrics.json").read_text())["log_history"]
    assert (
        [h["step"] for h in history if "eval_loss" in h]
        == [h["step"] for h in evals if "eval_loss" in h]
        == [0, 4, 8, 8]
    )


def test_one_run_per_run_directory(tmp_path, capsys, caplog):
    """The command line in this process (posttrain.cli.main) against a lock held by another live process."""
    from posttrain.cli import main

    caplog.set_level(logging.INFO, logger="posttrain")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "now"}))
        (tmp_path / "recipe.yaml").write_text("tasks:\n  - task: sort\n")
        path = write_pipeline(
            tmp_path, f"stages: [synth]\nsynth: {{recipe: {tmp_path / 'recipe.yaml'}, num_train: 4, num_eval: 2}}\n"
        )
        assert main(["run", path]) != 0
        assert f"in use by process {holder.pid}" in capsys.readouterr().err + caplog.text
        assert not (run_dir / "synth").exists()
    finally:
        holder.kill()
        holder.wait()
    caplog.clear()
    assert main(["run", path]) == 0
    assert "taking over" in capsys.readouterr().err + caplog.text  # the holder is gone: its lock is stale
    assert not (run_dir / LOCK).exists()


def test_damaged_newest_ppo_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model_dir, caplog):
    from .test_ppo import _setup

    path = _setup(tmp_path, tiny_model_dir, ppo={"updates": 3, "save_every": 1, "eval_samples": 0})
    run_pipeline(load_pipeline(path))
    stage = tmp_path / "run" / "ppo"
    ckpts = sorted((stage / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-000001", "step-000002"]  # two kept: a damaged newest has a fallback
    weights = ckpts[-1] / "policy.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    manifest = stage / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete"', '"running"'))
    summary = run_pipeline(load_pipeline(path))["ppo"]
    assert summary["resumed_from_update"] == 1
    assert "step-000002 is damaged" in caplog.text
    assert torch.isfinite(torch.tensor(summary["reward_last"]))


def test_a_trainer_checkpoint_with_a_torch_save_file_cut_short_is_damaged(tmp_path, caplog):
    """A SIGKILL can leave optimizer.pt half written; resuming from it failed on every re-run ("failed reading
    zip archive") instead of falling back to the checkpoint before."""
    from posttrain.checkpoint import checkpoint_problem, last_trainer_checkpoint

    for step in (1, 2):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text("{}")
        torch.save({"state": {0: torch.zeros(1000)}}, ckpt / "optimizer.pt")
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    optimizer = tmp_path / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    assert "optimizer.pt is cut short" in checkpoint_problem(tmp_path / "checkpoint-2")
    assert last_trainer_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert "checkpoint-2 is damaged" in caplog.text
