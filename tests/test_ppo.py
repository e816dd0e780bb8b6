"""PPO stage: the update moves probability toward higher reward, checkpoints resume, bad rewards stop
the run, and vLLM rollouts stay in sync with the trainer's weights."""

import json
from pathlib import Path

import pytest
import torch

from posttrain.data import prompt_of, write_jsonl
from posttrain.manifest import read_manifest
from posttrain.pipeline import load_pipeline, run_pipeline
from posttrain.rollout import pack_rollout, token_logprobs
from posttrain.stages import StageContext
from posttrain.stages.ppo import PPO

from .conftest import make_rows, write_pipeline

LENGTH_REWARD = "def longer(prompts, completions, **_):\n    return [len(c) / 10.0 for c in completions]\n"


def _setup(tmp_path, tiny_model_dir, reward_src=LENGTH_REWARD, ppo=None, backend="hf"):
    write_jsonl(tmp_path / "train.jsonl", make_rows(64, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", make_rows(16, seed=2))
    (tmp_path / "reward.py").write_text(reward_src)
    ppo = {
        "model": str(tiny_model_dir),
        "train_data": str(tmp_path / "train.jsonl"),
        "eval_data": str(tmp_path / "eval.jsonl"),
        "eval_samples": 8,
        "sampling": {"backend": backend, "temperature": 1.0, "max_new_tokens": 12},
        "scoring": {"rules": [{"path": str(tmp_path / "reward.py"), "function": "longer"}]},
        "updates": 4,
        "rollout_batch_size": 16,
        "mini_batch_size": 8,
        "learning_rate": 1e-3,
        "save_every": 2,
        **(ppo or {}),
    }
    return write_pipeline(tmp_path, f"seed: 0\nstages: [ppo]\nppo: {json.dumps(ppo)}\n")


def test_update_raises_logprob_of_high_reward_samples(tmp_path, tiny_model_dir):
    cfg = load_pipeline(_setup(tmp_path, tiny_model_dir))
    inputs = {k: getattr(cfg.ppo, k) for k in ("model", "train_data", "eval_data")}
    stage = PPO(cfg.ppo, StageContext(name="ppo", dir=tmp_path / "dbg", inputs=inputs, seed=0, pipeline=cfg))
    stage.ctx.dir.mkdir()
    stage.setup()
    idx = stage._next_prompts()
    prompts = [prompt_of(stage.rows[i]) for i in idx]
    samples = [s[0] for s in stage.engine.generate(prompts, cfg.ppo.sampling.model_copy(update={"seed": 3}))]
    scores = stage.scorer.score(prompts, [s.text for s in samples]).total
    assert scores.std() > 0  # random tiny model: lengths vary
    batch = pack_rollout([stage.prompt_ids[i] for i in idx], samples, stage.tokenizer.pad_token_id)
    roll = stage._prepare(batch, scores)
    mask = batch.response_mask
    seq_adv = (roll.adv * mask).sum(1) / mask.sum(1)
    assert torch.corrcoef(torch.stack([scores, seq_adv]))[0, 1] > 0.5
    before = (token_logprobs(stage.policy, batch) * mask).sum(1).detach()
    stage._optimise(batch, roll)
    after = (token_logprobs(stage.policy, batch) * mask).sum(1).detach()
    high = scores > scores.median()
    assert (after - before)[high].mean() > (after - before)[~high].mean()


def test_rloo_compares_samples_of_one_prompt_and_trains_without_a_value_model(tmp_path, tiny_model_dir):
    sampling = {"backend": "hf", "temperature": 1.0, "max_new_tokens": 12, "n": 4}
    cfg = load_pipeline(
        _setup(
            tmp_path,
            tiny_model_dir,
            ppo={"advantage": "rloo", "sampling": sampling, "rollout_batch_size": 8, "eval_samples": 0},
        )
    )
    inputs = {k: getattr(cfg.ppo, k) for k in ("model", "train_data", "eval_data")}
    stage = PPO(cfg.ppo, StageContext(name="ppo", dir=tmp_path / "dbg", inputs=inputs, seed=0, pipeline=cfg))
    stage.ctx.dir.mkdir()
    stage.setup()
    assert stage.value is None and set(stage.handles) == {"policy"}
    stats = stage._update(0)  # 8 prompts x 4 samples
    assert "value_loss" not in stats and stats["kl"] == 0.0
    idx = stage._next_prompts()
    groups = stage.engine.generate([prompt_of(stage.rows[i]) for i in idx], cfg.ppo.sampling)
    samples = [s for g in groups for s in g]
    scores = stage.scorer.score([], [s.text for s in samples]).total
    batch = pack_rollout([stage.prompt_ids[i] for i in idx for _ in range(4)], samples, stage.tokenizer.pad_token_id)
    roll = stage._prepare(batch, scores)
    seq_adv = (roll.adv * batch.response_mask).sum(1) / batch.response_mask.sum(1)
    within_group = scores.view(8, 4) - scores.view(8, 4).mean(1, keepdim=True)
    # advantages follow each sample's standing within its own prompt's group (whitened, plus a small KL term)
    assert torch.corrcoef(torch.stack([within_group.flatten(), seq_adv]))[0, 1] > 0.9
    stage.history.append(stats)
    stage._checkpoint(1)
    assert not (stage.ctx.dir / "checkpoints" / "step-000001" / "value.safetensors").exists()


def test_ptx_term_is_the_likelihood_of_the_reference_answers(tmp_path, tiny_model_dir):
    """PPO-ptx: the batch masks exactly each answer and its end-of-turn token, and a policy step with
    only the ptx term (zero reward) raises the likelihood of reference answers."""
    from posttrain.models import load_tokenizer
    from posttrain.rollout import answer_batch

    tok = load_tokenizer(tiny_model_dir)
    rows = make_rows(4, seed=3)
    batch = answer_batch(tok, rows)
    for i, row in enumerate(rows):
        answer_ids = batch.input_ids[i][batch.response_mask[i].bool()].tolist()
        assert tok.decode(answer_ids[:-1]) == row["messages"][-1]["content"]
        assert tok.convert_ids_to_tokens(answer_ids[-1]) == "<end_of_turn>" and batch.finished[i]
    zero = "def longer(prompts, completions, **_):\n    return [0.0] * len(completions)\n"  # no reward signal
    sampling = {"backend": "hf", "temperature": 1.0, "max_new_tokens": 12, "n": 2}
    cfg = load_pipeline(
        _setup(
            tmp_path,
            tiny_model_dir,
            zero,
            {  # rloo, no reward, KL or EOT penalty: A = 0
                "advantage": "rloo",
                "sampling": sampling,
                "ptx_coef": 1.0,
                "ptx_batch_size": 8,
                "kl_coef": 0.0,
                "missing_eot_penalty": 0.0,
                "eval_samples": 0,
            },
        )
    )
    inputs = {k: getattr(cfg.ppo, k) for k in ("model", "train_data", "eval_data")}
    stage = PPO(cfg.ppo, StageContext(name="ppo", dir=tmp_path / "dbg", inputs=inputs, seed=0, pipeline=cfg))
    stage.ctx.dir.mkdir()
    stage.setup()
    heldout = answer_batch(stage.tokenizer, stage.rows[:16])
    with torch.no_grad():
        before = (token_logprobs(stage.policy, heldout) * heldout.response_mask).sum()
    stats = [stage._update(u) for u in range(2)]
    with torch.no_grad():
        after = (token_logprobs(stage.policy, heldout) * heldout.response_mask).sum()
    assert after - before > 1.0, (before, after)  # nats over 16 answers; weight decay alone moves ~0.001
    assert all("ptx_loss" in s for s in stats)


def test_stage_checkpoints_resume_after_failure_and_plots(tmp_path, tiny_model_dir):
    flaky = LENGTH_REWARD.replace("def longer", "def _longer") + (
        "import pathlib\nCALLS = pathlib.Path(__file__).with_name('calls')\n"
        "def longer(prompts, completions, **kw):\n"
        "    n = int(CALLS.read_text()) if CALLS.exists() else 0\n"
        "    CALLS.write_text(str(n + 1))\n"
        "    if n == 2 and not pathlib.Path(__file__).with_name('healed').exists():\n"
        "        return [float('nan')] * len(completions)\n"
        "    return _longer(prompts, completions)\n"
    )
    path = _setup(tmp_path, tiny_model_dir, flaky, {"eval_samples": 0})
    with pytest.raises(FloatingPointError, match="non-finite reward"):
        run_pipeline(load_pipeline(path))  # update 3 (the third call) returns NaN
    stage_dir = tmp_path / "run" / "ppo"
    m = read_manifest(stage_dir)
    assert m["status"] == "failed" and "non-finite" in m["error"]
    assert [p.name for p in (stage_dir / "checkpoints").iterdir()] == ["step-000002"]
    (tmp_path / "healed").write_text("")
    summary = run_pipeline(load_pipeline(path))["ppo"]
    assert summary["updates"] == 4 and summary["resumed_from_update"] == 2
    history = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["update"] for h in history] == [1, 2, 3, 4]
    assert (stage_dir / "curves.png").stat().st_size > 1000
    assert set(summary["time_breakdown_s"]) == {"generate", "score", "sync", "train", "total"}
    assert (stage_dir / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_vllm_rollouts_stay_in_sync_with_trainer(tmp_path, tiny_model_dir, lora):
    ppo = {"updates": 3, "eval_samples": 0, "is_cap": 2.0, "lora": {"enabled": lora, "r": 4, "alpha": 8}}
    path = _setup(tmp_path, tiny_model_dir, ppo=ppo, backend="vllm")
    run_pipeline(load_pipeline(path))
    history = [json.loads(line) for line in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    # every rollout after the first was sampled from weights pushed after an update: if the push failed
    # (or, with LoRA, the adapters were not folded in), the engine's logprobs would drift from the trainer's
    assert all(h["logprob_gap"] < 1e-3 for h in history), [h["logprob_gap"] for h in history]
    assert history[-1]["kl"] != 0.0 and all(h["time/sync"] > 0 for h in history)


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero_stage,lora,extra", [(2, False, {}), (3, False, {"gradient_checkpointing": True}), (3, True, {})]
)
def test_ppo_under_deepspeed_two_processes_checkpoints_and_resumes(tmp_path, tiny_model_dir, zero_stage, lora, extra):
    dist = {"num_processes": 2, "zero_stage": zero_stage}
    lora_cfg = {"enabled": lora, "r": 4, "alpha": 8}
    path = _setup(
        tmp_path,
        tiny_model_dir,
        ppo={
            "updates": 3,
            "save_every": 2,
            "eval_samples": 4,
            "distributed": dist,
            "reference_mode": "ema",
            "lora": lora_cfg,
            "value_lora": lora_cfg,
            **extra,
        },
    )
    summary = run_pipeline(load_pipeline(path))["ppo"]
    stage_dir = tmp_path / "run" / "ppo"
    history = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["update"] for h in history] == [1, 2, 3] and summary["updates"] == 3
    assert history[-1]["kl"] != 0.0  # the policy moved away from the (EMA) anchor
    ckpt = stage_dir / "checkpoints" / "step-000002"
    assert (ckpt / "state.json").is_file() and (ckpt / "policy").is_dir() and (ckpt / "value").is_dir()
    from safetensors.torch import load_file

    trained = load_file(stage_dir / "model" / "model.safetensors")
    init = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # gathered, updated weights were saved

    # resume: mark the stage interrupted after the checkpoint at update 2 and run again
    manifest = stage_dir / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete"', '"running"'))
    (stage_dir / "metrics.jsonl").unlink()
    summary = run_pipeline(load_pipeline(path))["ppo"]
    history = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["update"] for h in history] == [1, 2, 3]  # 1-2 restored from the checkpoint, 3 re-run
    assert summary["resumed_from_update"] == 2


def headroom_rewards(tmp_path, ppo: dict) -> tuple[list[float], list[float]]:
    """SFT a tiny model briefly on the count task, then the RL stage with the exact-match verifier and `ppo`'s
    settings; the per-update rewards and KLs."""
    from .conftest import REPO

    (tmp_path / "recipe.yaml").write_text("tasks:\n  - task: count\n")
    sft = {
        "learning_rate": 3e-3,
        "epochs": 25,
        "batch_size": 16,
        "max_length": 64,
        "eval_samples": 0,
        "eval_steps": 1000,
    }
    ppo = {
        "scoring": {"rules": [{"path": str(REPO / "reward" / "verifiers.py"), "function": "task_correct"}]},
        "eval_samples": 0,
        "save_every": 100,
        **ppo,
    }
    base = {
        "family": "gemma2",
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "head_dim": 32,
        "intermediate_size": 128,
        "vocab_size": 300,
    }
    body = (
        f"seed: 0\nstages: [synth, base, sft, ppo]\nsynth: {{recipe: {tmp_path / 'recipe.yaml'}, num_train: 60, "
        f"num_eval: 8}}\nbase: {json.dumps(base)}\n"
        f"sft: {json.dumps(sft)}\nppo: {json.dumps(ppo)}\n"
    )
    run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))
    history = [json.loads(line) for line in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [h["reward"] for h in history], [h["kl"] for h in history]


@pytest.mark.slow
def test_ppo_raises_verifier_reward_on_a_task_with_headroom(tmp_path):
    """PPO with the exact-match verifier: the sampled reward of the last updates is clearly above the first
    ones, and KL to the reference stays bounded."""
    rewards, kls = headroom_rewards(
        tmp_path,
        {
            "sampling": {"backend": "hf", "temperature": 1.0, "max_new_tokens": 6},
            "updates": 14,
            "value_warmup_updates": 2,
            "rollout_batch_size": 64,
            "mini_batch_size": 16,
            "ppo_epochs": 4,
            "learning_rate": 3e-4,
            "kl_coef": 0.02,
        },
    )
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards
    assert max(kls) < 5.0
