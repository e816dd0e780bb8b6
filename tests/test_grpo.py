"""The GRPO family in the RL stage: every variant trains through the stage, the single-step mode skips
the rollout-policy forward, dynamic sampling refills groups, and GRPO raises the verifier reward on a
task with headroom."""

import pytest
import torch

from posttrain.pipeline import load_pipeline
from posttrain.stages import StageContext
from posttrain.stages.ppo import PPO

from .test_ppo import LENGTH_REWARD, _setup, headroom_rewards

GRPO = {
    "advantage": "grpo",
    "sampling": {"backend": "hf", "temperature": 1.0, "max_new_tokens": 12, "n": 4},
    "rollout_batch_size": 4,
    "mini_batch_size": 16,
    "ppo_epochs": 1,
    "kl_mode": "loss",
    "kl_coef": 0.04,
    "loss_aggregation": "sequence_mean",
    "eval_samples": 0,
    "updates": 2,
}


def _stage(tmp_path, tiny_model_dir, reward_src=LENGTH_REWARD, **ppo):
    cfg = load_pipeline(_setup(tmp_path, tiny_model_dir, reward_src, ppo={**GRPO, **ppo}))
    inputs = {k: getattr(cfg.ppo, k) for k in ("model", "train_data", "eval_data")}
    stage = PPO(cfg.ppo, StageContext(name="ppo", dir=tmp_path / "dbg", inputs=inputs, seed=0, pipeline=cfg))
    stage.ctx.dir.mkdir()
    stage.setup()
    return stage


@pytest.mark.parametrize(
    "variant",
    [
        {},  # GRPO: std-scaled, sequence mean, k3 KL loss
        {"scale_by_std": False, "loss_aggregation": "constant", "kl_mode": "off"},  # Dr. GRPO
        {
            "clip_low": 0.2,
            "clip_high": 0.28,
            "loss_aggregation": "token_mean",
            "overlong_cache": 4,
            "dynamic_sampling": True,
        },  # DAPO
        {"ratio_level": "sequence", "clip_eps": 0.0004},  # GSPO
        {"kl_mode": "reward", "kl_estimator": "k3", "ppo_epochs": 2, "mini_batch_size": 8},  # KL in the reward
    ],
)
def test_every_variant_trains_through_the_stage(tmp_path, tiny_model_dir, variant):
    stage = _stage(tmp_path, tiny_model_dir, **variant)
    assert stage.value is None and set(stage.handles) == {"policy"}
    assert (stage.reference is None) == (stage.cfg.kl_mode == "off")  # no KL term: no reference model loaded
    before = {k: v.clone() for k, v in stage.policy.state_dict().items()}
    stats = [stage._update(u) for u in range(2)]
    after = stage.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for s in stats:
        assert all(torch.isfinite(torch.tensor(v)) for v in s.values())
        assert s["kl_coef"] == (0.0 if stage.cfg.kl_mode == "off" else stage.cfg.kl_coef)  # off: no KL term
    if stage.cfg.kl_mode == "loss":
        assert "kl_loss" in stats[0] and stats[1]["kl"] > 0  # the second update starts away from the reference
    if variant.get("dynamic_sampling"):
        assert stats[0]["dynamic/groups_sampled"] >= 4


def test_dynamic_sampling_refills_groups_that_all_score_alike(tmp_path, tiny_model_dir):
    """A constant reward makes every group uninformative: each of the 4 rounds samples 4 more prompts, and the
    batch is then filled with set-aside groups."""
    constant = "def longer(prompts, completions, **_):\n    return [1.0] * len(completions)\n"
    stage = _stage(tmp_path, tiny_model_dir, constant, dynamic_sampling=True, missing_eot_penalty=0.0)
    stats = stage._update(0)
    assert stats["dynamic/groups_sampled"] == 16 and stats["dynamic/groups_uninformative"] == 16
    assert stats["dynamic/groups_filled_uninformative"] == 4


def test_single_step_skips_the_rollout_policy_forward(tmp_path, tiny_model_dir, monkeypatch):
    """One optimiser step per rollout (1 epoch, one mini-batch) and no KL in the reward: the trainer's forward
    gives the old logprobs (ratio exactly 1); with two epochs the no-grad forward runs again."""
    from posttrain.stages.ppo import stage as stage_module

    calls = []
    real = stage_module.token_logprobs
    monkeypatch.setattr(
        stage_module,
        "token_logprobs",
        lambda m, b, *a, **k: calls.append(torch.is_grad_enabled()) or real(m, b, *a, **k),
    )
    single = _stage(tmp_path / "a", tiny_model_dir)
    stats = single._update(0)
    # one reference forward (no grad) and one training forward (grad): no separate rollout-policy pass
    assert calls == [False, True] and stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0
    calls.clear()
    twice = _stage(tmp_path / "b", tiny_model_dir, ppo_epochs=2)
    twice._update(0)
    assert calls == [False, False, True, True]  # rollout policy + reference, then one forward per epoch


@pytest.mark.slow
def test_grpo_raises_verifier_reward_on_a_task_with_headroom(tmp_path):
    """As the PPO test: GRPO (group-normalised, k3 KL in the loss) with the exact-match verifier on a briefly
    SFT-ed counting model: the sampled reward of the last updates is clearly above the first ones."""
    rewards, kls = headroom_rewards(
        tmp_path,
        {
            "advantage": "grpo",
            "kl_mode": "loss",
            "kl_coef": 0.02,
            "loss_aggregation": "token_mean",
            "sampling": {"backend": "hf", "temperature": 1.0, "max_new_tokens": 6, "n": 8},
            "updates": 14,
            "rollout_batch_size": 16,
            "mini_batch_size": 32,
            "ppo_epochs": 2,
            "learning_rate": 3e-4,
        },
    )
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards
    assert max(kls) < 5.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero_stage,extra", [(0, {}), (2, {}), (2, {"reference_placement": "disk", "gradient_checkpointing": True})]
)
def test_grpo_groups_on_two_ranks(tmp_path, tiny_model_dir, zero_stage, extra):
    """Two processes (DDP, or DeepSpeed ZeRO-2), 4 samples per prompt: each rank's forwards share its groups'
    prompts and give the tied embedding its gradient in two parts, with no collective in the forward pass.
    The run must not hang (a rank that shares and one that does not would, under ZeRO-3), and it trains;
    also with the reference read from disk by each rank and gradient checkpointing (no sharing in training)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from posttrain.pipeline import run_pipeline

    ppo = {**GRPO, "rollout_batch_size": 4, "distributed": {"num_processes": 2, "zero_stage": zero_stage}, **extra}
    summary = run_pipeline(load_pipeline(_setup(tmp_path, tiny_model_dir, ppo=ppo)))["ppo"]
    stage_dir = tmp_path / "run" / "ppo"
    history = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["updates"] == 2 and [h["update"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for h in history for v in h.values() if isinstance(v, float))
    assert history[-1]["kl"] > 0  # the second update samples from a policy that moved
    trained = load_file(stage_dir / "model" / "model.safetensors")
    init = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(trained[k], init[k]) for k in init)


def test_kl_mode_off_may_be_written_bare_in_yaml():
    """YAML 1.1 reads `off` as false; the README's table writes it bare."""
    import yaml

    from posttrain.stages.ppo.config import PPOConfig

    section = yaml.safe_load("kl_mode: off\nadvantage: grpo\nsampling: {n: 2, temperature: 1.0}\n")
    assert section["kl_mode"] is False and PPOConfig.model_validate(section).kl_mode == "off"


def test_critic_free_advantages_are_not_whitened_by_default():
    """Whitening shifts the batch mean: a group that scored alike would get a non-zero advantage, and
    Dr. GRPO's unscaled advantages would be scaled after all."""
    from posttrain.stages.ppo.config import PPOConfig

    sampling = {"n": 2, "temperature": 1.0}
    assert PPOConfig().whitens and not PPOConfig(advantage="grpo", sampling=sampling).whitens
    assert PPOConfig(advantage="rloo", sampling=sampling, whiten_advantages=True).whitens
