"""Experiment tracking: off by default; TensorBoard event files hold the Trainer stages' loss and the RL
loop's per-update reward; a missing tracker package is a config error naming the key."""

import json

import pytest

from posttrain.config import ConfigError
from posttrain.data import write_jsonl
from posttrain.pipeline import load_pipeline, run_pipeline

from .conftest import make_rows, write_pipeline


def _scalars(event_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_sft_loss_and_ppo_reward_series(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    write_jsonl(tmp_path / "train.jsonl", make_rows(48, seed=1))
    (tmp_path / "r.py").write_text(
        "def longer(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n"
    )
    sft = {
        "model": str(tiny_model_dir),
        "train_data": str(tmp_path / "train.jsonl"),
        "max_steps": 6,
        "logging_steps": 2,
        "batch_size": 8,
        "eval_samples": 0,
    }
    ppo = {
        "train_data": str(tmp_path / "train.jsonl"),
        "updates": 3,
        "rollout_batch_size": 4,
        "mini_batch_size": 4,
        "eval_samples": 0,
        "sampling": {"backend": "hf", "temperature": 1.0, "max_new_tokens": 6},
        "scoring": {"rules": [{"path": str(tmp_path / "r.py"), "function": "longer"}]},
    }
    body = f"stages: [sft, ppo]\nreport_to: [tensorboard]\nsft: {json.dumps(sft)}\nppo: {json.dumps(ppo)}\n"
    run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))
    sft_series = _scalars(tmp_path / "run" / "sft" / "tensorboard")
    assert [step for step, _ in sft_series["train/loss"]] == [1, 2, 4, 6]  # logging_first_step, then every 2
    ppo_series = _scalars(tmp_path / "run" / "ppo" / "tensorboard")
    history = [json.loads(line) for line in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in ppo_series["reward"]] == pytest.approx([h["reward"] for h in history])
    assert {"kl", "policy_loss", "time/generate"} <= set(ppo_series)


def test_no_tracking_by_default_and_missing_packages_are_named(tmp_path, monkeypatch):
    cfg = load_pipeline(write_pipeline(tmp_path, "stages: [sft]\n"))
    assert cfg.report_to == [] and cfg.sft.report_to is None
    import posttrain.tracking as tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    cfg = load_pipeline(write_pipeline(tmp_path, "stages: [sft]\nsft: {report_to: [wandb]}\n"))
    with pytest.raises(ConfigError, match=r"sft.report_to: wandb needs the package\(s\) wandb"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "sft").exists()  # refused before any work
    with pytest.raises(ConfigError, match="report_to"):
        load_pipeline(write_pipeline(tmp_path, "stages: [sft]\nreport_to: [neptune]\n"))


def test_a_resumed_tracker_shows_each_step_once(tmp_path, monkeypatch):
    """A run killed after logging step 3 but checkpointed at 2 resumes at step 3: TensorBoard must not show
    the interrupted run's step 3 beside the new one."""
    pytest.importorskip("tensorboard")
    from posttrain.tracking import Tracker

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    first = Tracker(["tensorboard"], tmp_path, {})
    for step in (1, 2, 3):
        first.log({"reward": -step}, step)
    first.close()
    resumed = Tracker(["tensorboard"], tmp_path, {}, first_step=3)
    for step in (3, 4):
        resumed.log({"reward": step}, step)
    resumed.close()
    assert _scalars(tmp_path / "tensorboard")["reward"] == [(1, -1), (2, -2), (3, 3), (4, 4)]
