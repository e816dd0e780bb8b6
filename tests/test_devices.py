"""The device and precision seam: which device a rank computes on, what precision each stage gets, and
the settings Trainers and DeepSpeed receive. Tests marked `gpu` run only where CUDA is present."""

import pytest
import torch

from posttrain.config import ConfigError, DistributedConfig
from posttrain.dist import rank as R
from posttrain.dist.trainable import deepspeed_config, trainer_kwargs
from posttrain.pipeline import check_devices, load_pipeline, stage_precision

from .conftest import write_pipeline


NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
"""Marked `gpu` (scripts/gpu_check.sh runs `pytest -m gpu`) and skipped where CUDA is absent."""


def gpu(test):
    """A test that needs CUDA (`NEEDS_CUDA`)."""
    for mark in NEEDS_CUDA:
        test = mark(test)
    return test


CPU_AND_CUDA = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
"""`pytest.mark.parametrize("device", CPU_AND_CUDA)`: the test on the CPU everywhere and, marked `gpu`, on
CUDA where present."""


def test_device_rule_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert R.resolve_device("auto") == torch.device("cpu") and R.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA"):
        R.resolve_device("cuda")
    with pytest.raises(ValueError, match="expected auto, cpu"):
        R.resolve_device("tpu")


def test_device_rule_gives_each_rank_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert R.resolve_device("auto") == torch.device("cuda:3") and R.resolve_device("cuda") == torch.device("cuda:3")
    assert R.resolve_device("cuda:5") == torch.device("cuda:5") and R.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="only 8 CUDA"):
        R.resolve_device("cuda:9")


def test_precision_per_stage_and_fp16_needs_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_pipeline(write_pipeline(tmp_path, "stages: [sft, ppo]\nprecision: bf16\nppo: {precision: fp32}\n"))
    assert stage_precision(cfg, cfg.sft) == "bf16" and stage_precision(cfg, cfg.ppo) == "fp32"
    assert check_devices(cfg, ["sft", "ppo"]) == torch.device("cpu")
    cfg = load_pipeline(write_pipeline(tmp_path, "stages: [sft]\nsft: {precision: fp16}\n"))
    with pytest.raises(ConfigError, match="sft.precision: fp16 mixed precision needs a CUDA device"):
        check_devices(cfg, ["sft"])
    with pytest.raises(ConfigError, match="precision"):
        load_pipeline(write_pipeline(tmp_path, "stages: [sft]\nprecision: fp8\n"))
    cfg = load_pipeline(write_pipeline(tmp_path, "stages: [sft]\ndevice: cuda\n"))
    with pytest.raises(ConfigError, match="device: device 'cuda' was asked for"):
        check_devices(cfg, ["sft"])


def test_trainer_and_deepspeed_settings_follow_device_and_precision(monkeypatch):
    cpu = torch.device("cpu")
    assert trainer_kwargs(DistributedConfig(), cpu, "bf16") == {"bf16": True, "fp16": False, "use_cpu": True}
    assert trainer_kwargs(DistributedConfig(), torch.device("cuda:0"), "fp32")["use_cpu"] is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    kw = trainer_kwargs(DistributedConfig(num_processes=2, zero_stage=3), cpu, "bf16")
    assert kw["bf16"] and kw["deepspeed"]["bf16"] == {"enabled": "auto"}  # the Trainer fills it from bf16=True
    assert kw["deepspeed"]["zero_optimization"]["stage"] == 3
    ours = deepspeed_config(DistributedConfig(zero_stage=2), "bf16", for_trainer=False)
    assert ours["bf16"] == {"enabled": True} and ours["fp16"] == {"enabled": False}


def test_engine_groups_and_shards(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    assert R.engine_group(2) == (2, 4, 1) and R.engine_group(8) == (0, 1, 5) and R.engine_group(1) == (5, 8, 0)
    with pytest.raises(ValueError, match="does not divide the 8 ranks"):
        R.engine_group(3)
    bounds = [R.shard_bounds(10, 4, i) for i in range(4)]
    assert bounds == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_autocast_context():
    cpu = torch.device("cpu")
    with R.autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with R.autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@gpu
def test_one_process_on_a_gpu_machine_uses_the_gpu(tmp_path, tiny_model_dir):
    """The RL stage places its models on cuda:0 when CUDA is present, and a pipeline with device auto runs
    it there."""
    from posttrain.pipeline import run_pipeline
    from posttrain.stages import StageContext
    from posttrain.stages.ppo import PPO

    from .conftest import make_rows
    from posttrain.data import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", make_rows(32))
    body = (
        f"stages: [ppo]\nprecision: bf16\nppo: {{model: {tiny_model_dir}, train_data: {tmp_path / 'train.jsonl'}, "
        f"updates: 1, rollout_batch_size: 4, mini_batch_size: 4, eval_samples: 0, "
        f"sampling: {{backend: hf, temperature: 1.0, max_new_tokens: 4}}, "
        f"scoring: {{rules: [{{path: {tmp_path / 'r.py'}, function: f}}]}}}}\n"
    )
    (tmp_path / "r.py").write_text("def f(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    cfg = load_pipeline(write_pipeline(tmp_path, body))
    inputs = {"model": str(tiny_model_dir), "train_data": str(tmp_path / "train.jsonl")}
    stage = PPO(
        cfg.ppo,
        StageContext(
            name="ppo",
            dir=tmp_path / "s",
            inputs=inputs,
            seed=0,
            pipeline=cfg,
            device=torch.device("cuda:0"),
            precision="bf16",
        ),
    )
    stage.ctx.dir.mkdir()
    stage.setup()
    assert next(stage.policy.parameters()).device.type == "cuda"
    assert next(stage.reference.model.parameters()).dtype == torch.bfloat16
    summary = run_pipeline(cfg)
    assert summary["ppo"]["status"] == "ran" and summary["ppo"]["device"].startswith("cuda"), summary
