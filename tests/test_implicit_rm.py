"""rm.head: implicit — the reward β · mean log π(answer | prompt) of a causal LM, trained with the
Bradley-Terry loss; scored through the same Scorer as the sequence-classification head."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.data import write_jsonl
from posttrain.implicit_rm import read_reward_head, write_reward_head
from posttrain.pairs import PairCollator, tokenize_pairs
from posttrain.scoring import Scorer, ScoringConfig
from posttrain.stages import StageContext
from posttrain.stages.rm import RM, RMConfig, build_implicit_trainer, read_pairs, score_pairs

from .conftest import TINY
from .test_prefs_rm import _conv, _run_prefs, rows_of, run_prefs_rm_pipeline

torch.set_num_threads(1)

PAIRS = [
    {"chosen": _conv("Sort: 3, 1", "1, 3"), "rejected": _conv("Sort: 3, 1", "3, 1, 1, 1, 1")},
    {"chosen": _conv("Who are you?", "I am Posttrain-Tiny."), "rejected": _conv("Who are you?", "I am GPT.")},
    {"chosen": _conv("Count 'cat'.", "3"), "rejected": _conv("Count 'cat'.", "4")},
    {"chosen": _conv("Reverse: a, b", "b, a"), "rejected": _conv("Reverse: a, b", "I can't help with that.")},
]


@torch.no_grad()
def _own_implicit_reward(model, tokenizer, conv, beta: float) -> float:
    """β · mean log p of the answer's tokens (through the end-of-turn token), one unpadded conversation
    at a time, with the answer found where the generation prompt ends."""
    prompt = tokenizer.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)
    full = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    start = len(prompt["input_ids"])
    assert full[:start] == prompt["input_ids"]
    end = full.index(tokenizer.convert_tokens_to_ids("<end_of_turn>"), start) + 1
    logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
    answer_logps = [logp[t - 1, full[t]].item() for t in range(start, end)]
    return beta * sum(answer_logps) / len(answer_logps)


def _implicit_rm_dir(tmp_path, model_dir, beta: float):
    """A causal LM directory marked as an implicit reward model."""
    import shutil

    out = tmp_path / "implicit_rm"
    shutil.copytree(model_dir, out)
    write_reward_head(out, beta)
    return out


def test_scorer_gives_beta_times_the_mean_answer_logprob(tmp_path, tiny_model_dir):
    from posttrain.models import load_model, load_tokenizer

    rm_dir = _implicit_rm_dir(tmp_path, tiny_model_dir, beta=2.5)
    prompts = [p["chosen"][:-1] for p in PAIRS] * 2
    answers = [p["chosen"][-1]["content"] for p in PAIRS] + [p["rejected"][-1]["content"] for p in PAIRS]
    got = Scorer(ScoringConfig(batch_size=3), reward_model_dir=str(rm_dir)).score(prompts, answers).parts
    model, tok = load_model(rm_dir, device="cpu").eval(), load_tokenizer(rm_dir)
    own = [
        _own_implicit_reward(model, tok, p + [{"role": "assistant", "content": a}], 2.5)
        for p, a in zip(prompts, answers)
    ]
    assert torch.allclose(got["reward_model"], torch.tensor(own), atol=1e-5)  # batched + padded = one at a time
    assert len(set(round(x, 4) for x in own)) == len(own)


def test_implicit_loss_is_bradley_terry_on_the_implicit_rewards(tmp_path, tiny_model_dir):
    from posttrain.models import load_model, load_tokenizer

    rows = [dict(r, margin=m) for r, m in zip(PAIRS, [0.5, -0.3, 2.0, 0.0])]
    model, tok = load_model(tiny_model_dir, device="cpu").eval(), load_tokenizer(tiny_model_dir)
    cfg = RMConfig(head="implicit", beta=1.5, use_margin=True, center_rewards_coefficient=0.1, batch_size=4)
    pairs = tokenize_pairs(tok, rows)
    trainer = build_implicit_trainer(model, tok, pairs, [], cfg, tmp_path, seed=0)
    batch = PairCollator(tok.pad_token_id, use_margin=True)(pairs)
    assert (batch["input_ids"][:, -1] == tok.pad_token_id).any()  # padding is really exercised
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
    r_c = torch.tensor([_own_implicit_reward(model, tok, r["chosen"], 1.5) for r in rows])
    r_r = torch.tensor([_own_implicit_reward(model, tok, r["rejected"], 1.5) for r in rows])
    m = torch.tensor([0.5, -0.3, 2.0, 0.0])
    expected = -torch.nn.functional.logsigmoid(r_c - r_r - m).mean() + 0.1 * ((r_c + r_r) ** 2).mean()
    assert loss == pytest.approx(expected.item(), abs=1e-5)
    assert (r_c - r_r).abs().min() > 1e-4


def test_implicit_rm_stage_learns_the_preferences_and_is_scored_and_reused(tmp_path, tiny_model_dir):
    """Corruption pairs -> implicit RM: held-out accuracy rises well above the untrained LM's, the saved
    dir is a causal LM the Scorer recognises, and PPO can start its value model from it."""
    from posttrain.models import load_model, load_tokenizer
    from posttrain.stages.ppo.value import load_value_model

    tasks = ["sort", "count", "safety", "identity", "reverse"]
    write_jsonl(tmp_path / "train.jsonl", rows_of(tasks, 400, seed=11))
    write_jsonl(tmp_path / "eval.jsonl", rows_of(tasks, 60, seed=12))
    prefs_dir, _ = _run_prefs(
        tmp_path, tiny_model_dir, best_of_n={"enabled": False}, teacher={"enabled": False}, corruption={"per_prompt": 2}
    )
    eval_pairs = read_pairs(str(prefs_dir / "eval.jsonl"))
    untrained = Scorer(ScoringConfig(), reward_model_dir=str(_implicit_rm_dir(tmp_path, tiny_model_dir, 2.0)))
    chosen, rejected = score_pairs(untrained, eval_pairs)
    before = (chosen > rejected).float().mean().item()
    cfg = RMConfig(
        head="implicit",
        learning_rate=3e-3,
        epochs=2,
        batch_size=16,
        max_length=96,
        eval_steps=25,
        logging_steps=5,
        auc={"prompts": 0},
    )
    ctx = StageContext(
        name="rm",
        dir=tmp_path / "rm",
        seed=0,
        inputs={
            "model": str(tiny_model_dir),
            "prefs_train": str(prefs_dir / "train.jsonl"),
            "prefs_eval": str(prefs_dir / "eval.jsonl"),
        },
    )
    ctx.dir.mkdir()
    metrics = RM(cfg, ctx).run()
    # measured: 0.58 for the untrained LM, 0.96 after training (shuffled lists are the hard part)
    assert metrics["heldout"]["accuracy"] >= 0.9 and metrics["heldout"]["accuracy"] > before + 0.2, (before, metrics)
    log = json.loads((ctx.dir / "metrics.json").read_text())["log_history"]
    assert any("eval_accuracy" in e for e in log) and any("accuracy" in e and "loss" in e for e in log)
    out = ctx.dir / "model"
    assert read_reward_head(out) == {"head": "implicit", "beta": 2.0}
    assert not (out / "training_args.bin").exists() and not (ctx.dir / "checkpoints").exists()
    saved = load_model(out, device="cpu")  # a plain causal LM
    assert type(saved).__name__.endswith("ForCausalLM")
    # PPO's value init: the RM's body, a new head
    value = load_value_model(str(out), load_tokenizer(out), torch.device("cpu"))
    assert torch.equal(value.model.embed_tokens.weight, saved.model.embed_tokens.weight)


def test_implicit_rm_lora_is_saved_merged_and_resumes(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", rows_of(["sort", "safety"], 24, seed=3))
    write_jsonl(tmp_path / "eval.jsonl", rows_of(["sort", "safety"], 6, seed=4))
    prefs_dir, _ = _run_prefs(tmp_path, tiny_model_dir, best_of_n={"enabled": False}, teacher={"enabled": False})

    def stage(**kw) -> RM:
        cfg = RMConfig(
            head="implicit",
            lora={"enabled": True, "r": 4, "alpha": 8},
            batch_size=8,
            save_steps=2,
            learning_rate=1e-2,
            max_length=96,
            auc={"prompts": 0},
            **kw,
        )
        ctx = StageContext(
            name="rm",
            dir=tmp_path / "rm",
            seed=0,
            inputs={"model": str(tiny_model_dir), "prefs_train": str(prefs_dir / "train.jsonl")},
        )
        ctx.dir.mkdir(exist_ok=True)
        return RM(cfg, ctx)

    first = stage(max_steps=4, keep_checkpoints=True).run()
    assert first["steps"] == 4 and "resumed_from_step" not in first
    second = stage(max_steps=6).run()  # as if the run had been stopped at step 4
    assert second["resumed_from_step"] == 4 and second["steps"] == 6
    saved = load_file(tmp_path / "rm" / "model" / "model.safetensors")
    init = load_file(tiny_model_dir / "model.safetensors")
    assert saved.keys() == init.keys()  # adapters merged away
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[key], init[key])
    assert torch.equal(saved["model.embed_tokens.weight"], init["model.embed_tokens.weight"])


def test_recurrent_gemma_becomes_an_implicit_reward_model(tmp_path, tiny_tokenizer):
    """No sequence classifier exists for RecurrentGemma; the implicit head needs none."""
    from posttrain.models import ModelConfig, build_tiny_model, load_tokenizer, save_model_dir
    from posttrain.stages.rm import load_reward_init

    cfg = ModelConfig(family="recurrent_gemma", **{**TINY, "num_layers": 3})
    out = save_model_dir(build_tiny_model(cfg, tiny_tokenizer), tiny_tokenizer, tmp_path / "rg")
    model = load_reward_init(out, seed=0, head="implicit").eval()
    write_reward_head(out, 1.0)
    got = Scorer(ScoringConfig(batch_size=2), reward_model_dir=str(out)).reward_model_scores(
        [p["chosen"][:-1] for p in PAIRS], [p["chosen"][-1]["content"] for p in PAIRS]
    )
    own = [_own_implicit_reward(model, load_tokenizer(out), p["chosen"], 1.0) for p in PAIRS]
    assert torch.allclose(got, torch.tensor(own), atol=1e-4)


@pytest.mark.slow
def test_implicit_rm_under_deepspeed_zero3_two_processes(tmp_path, tiny_model_dir):
    """prefs -> implicit rm as 2 ZeRO-3 ranks: one gathered causal LM with its head file."""
    m = run_prefs_rm_pipeline(
        tmp_path, tiny_model_dir, head="implicit", learning_rate=1e-3, distributed={"num_processes": 2, "zero_stage": 3}
    )
    assert m["processes"] == 2 and m["steps"] == 6 and m["heldout"]["pairs"] > 0
    out = tmp_path / "run" / "rm" / "model"
    assert read_reward_head(out)["beta"] == 2.0
    saved, init = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert saved.keys() == init.keys() and all(saved[k].shape == init[k].shape for k in init)  # whole, not shards
    assert any(not torch.equal(saved[k], init[k]) for k in init)


@pytest.mark.slow
def test_implicit_rm_as_two_ddp_ranks_trains_as_zero2_does(tmp_path, tiny_model_dir):
    """zero_stage 0 is DDP: the two ranks train one model on one batch stream, so the run's loss and held-out
    scores are ZeRO-2's. (On CPU the ranks used to train apart, each on its half of the data.)"""
    runs = {}
    for stage in (0, 2):
        (tmp_path / str(stage)).mkdir()
        runs[stage] = run_prefs_rm_pipeline(
            tmp_path / str(stage),
            tiny_model_dir,
            head="implicit",
            learning_rate=1e-3,
            distributed={"num_processes": 2, "zero_stage": stage},
        )
    assert runs[0]["processes"] == 2 and runs[0]["deepspeed_zero_stage"] is None
    assert runs[0]["train_loss"] == pytest.approx(runs[2]["train_loss"], abs=1e-4)
    for key in ("accuracy", "mean_margin", "chosen_mean", "rejected_mean"):
        assert runs[0]["heldout"][key] == pytest.approx(runs[2]["heldout"][key], abs=1e-3), key


def test_a_malformed_reward_head_file_is_named(tmp_path):
    (tmp_path / "reward_head.json").write_text(json.dumps({"head": "implicit"}))
    with pytest.raises(ValueError, match=r"reward_head\.json.*beta"):
        read_reward_head(tmp_path)
    assert read_reward_head(tmp_path / "elsewhere") is None


def test_logged_accuracy_is_over_pairs_not_a_mean_of_batch_means(tmp_path, tiny_model_dir, monkeypatch):
    """Held-out batches of 3 pairs and of 1: the logged accuracy and margin are means over the 4 pairs (the
    held-out accuracy the stage reports beside it), not the mean of the two batches' means."""
    from transformers import Trainer

    from posttrain.models import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir, device="cpu").eval(), load_tokenizer(tiny_model_dir)
    pairs = tokenize_pairs(tok, PAIRS)
    trainer = build_implicit_trainer(model, tok, pairs, [], RMConfig(head="implicit", beta=1.0), tmp_path, seed=0)
    collate = PairCollator(tok.pad_token_id, use_margin=False)
    with torch.no_grad():
        for chunk in (pairs[:3], pairs[3:]):
            trainer.compute_loss(model, dict(collate(chunk)))
    logged = {}
    monkeypatch.setattr(Trainer, "log", lambda self, logs, start_time=None: logged.update(logs))
    trainer.log({"eval_loss": 0.0})
    margins = [
        _own_implicit_reward(model, tok, r["chosen"], 1.0) - _own_implicit_reward(model, tok, r["rejected"], 1.0)
        for r in PAIRS
    ]
    wins = [float(m > 0) for m in margins]
    assert logged["eval_accuracy"] == pytest.approx(sum(wins) / 4)
    assert logged["eval_margin"] == pytest.approx(sum(margins) / 4, abs=1e-5)
    assert (sum(margins[:3]) / 3 + margins[3]) / 2 != pytest.approx(sum(margins) / 4, abs=1e-3)  # tells them apart
