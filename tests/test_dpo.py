"""dpo: each loss type against its formula recomputed from the model's own logprobs, the stage end to
end (held-out preference accuracy rises), LoRA with the adapter-free base as reference, resume, config
errors, eval comparing dpo against sft and ppo, and 2 ZeRO-3 ranks (slow)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file

from posttrain.algos.reward import simpo_loss
from posttrain.data import write_jsonl
from posttrain.pairs import tokenize_pairs
from posttrain.stages import StageContext
from posttrain.stages.dpo import DPO, DPOConfig, build_trainer

from .test_implicit_rm import PAIRS
from .test_prefs_rm import _run_prefs, rows_of, run_prefs_then

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Loss values


def test_simpo_loss_by_hand():
    # chosen: mean log p = (-1 - 2) / 2 = -1.5; rejected: (-3 - 1 - 2) / 3 = -2 (the padded -9 is masked out)
    chosen, c_mask = torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    rejected, r_mask = torch.tensor([[-3.0, -1.0, -2.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    # beta 2, gamma 0.5: -log sigmoid(2 * (-1.5) - 2 * (-2) - 0.5) = -log sigmoid(0.5) = log(1 + e^-0.5)
    got = simpo_loss(chosen, c_mask, rejected, r_mask, beta=2.0, gamma=0.5)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)
    # two pairs: the mean; the second has mean log p -1 vs -1 and only gamma left: log(1 + e^0.5)
    two = simpo_loss(
        torch.cat([chosen, torch.tensor([[-1.0, 0, 0]])]),
        torch.cat([c_mask, torch.tensor([[1.0, 0, 0]])]),
        torch.cat([rejected, torch.tensor([[-1.0, -1.0, 0]])]),
        torch.cat([r_mask, torch.tensor([[1.0, 1, 0]])]),
        beta=2.0,
        gamma=0.5,
    )
    assert two.item() == pytest.approx((math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5))) / 2, abs=1e-6)


@torch.no_grad()
def _own_answer_logp(model, tokenizer, conv) -> tuple[float, int]:
    """Sum of log p over the answer's tokens through `<end_of_turn>`, and their count: one unpadded
    conversation at a time, the answer found where the generation prompt ends."""
    prompt = tokenizer.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)
    full = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    start = len(prompt["input_ids"])
    end = full.index(tokenizer.convert_tokens_to_ids("<end_of_turn>"), start) + 1
    logp = model(torch.tensor([full[:end]])).logits[0].log_softmax(-1)
    return sum(logp[t - 1, full[t]].item() for t in range(start, end)), end - start


def _expected_loss(
    loss_type: str,
    pol: torch.Tensor,
    ref: torch.Tensor,
    beta: float,
    eps: float = 0.0,
    gamma: float = 0.0,
    sft_weight: float = 0.0,
) -> float:
    """The paper's formula on (sum log p, length) rows [chosen_sum, chosen_len, rejected_sum, rejected_len]."""
    d_c, d_r = pol[:, 0] - ref[:, 0], pol[:, 2] - ref[:, 2]
    h = d_c - d_r
    if loss_type == "sigmoid":  # Rafailov et al. 2023, eq. 7
        per = -F.logsigmoid(beta * h)
    elif loss_type == "hinge":  # SLiC-HF, Zhao et al. 2023
        per = torch.relu(1 - beta * h)
    elif loss_type == "ipo":  # Azar et al. 2023, eq. 17, log-ratios per answer token (TRL's normalisation)
        per = (d_c / pol[:, 1] - d_r / pol[:, 3] - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":  # Chowdhury et al. 2024, eq. 11
        per = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:  # SimPO, Meng et al. 2024, eq. 6: no reference
        per = -F.logsigmoid(beta * (pol[:, 0] / pol[:, 1] - pol[:, 2] / pol[:, 3]) - gamma)
    nll = -pol[:, 0].sum() / pol[:, 1].sum()  # RPO's term: the chosen answers' mean token NLL
    return (per.mean() + sft_weight * nll).item()


@pytest.mark.parametrize(
    "loss_type,extra",
    [
        ("sigmoid", {}),
        ("ipo", {}),
        ("hinge", {}),
        ("robust", {"label_smoothing": 0.2}),
        ("simpo", {"simpo_gamma": 0.3}),
        ("sigmoid", {"sft_weight": 0.4}),
        ("simpo", {"sft_weight": 0.4}),
    ],
)
def test_each_loss_equals_its_formula_on_the_models_own_logprobs(tmp_path, tiny_model_dir, loss_type, extra):
    from posttrain.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ref = load_model(tiny_model_dir, device="cpu").eval()
    policy = load_model(tiny_model_dir, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():  # a policy that differs from the reference, so every log-ratio is non-zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    own = copy.deepcopy(policy).eval()
    beta = 0.7
    cfg = DPOConfig(loss_type=loss_type, beta=beta, batch_size=4, **extra)
    pairs = list(zip(PAIRS, tokenize_pairs(tok, PAIRS)))
    trainer = build_trainer(policy, None if loss_type == "simpo" else ref, tok, pairs, [], cfg, tmp_path, seed=0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    assert (batch["input_ids"] == tok.pad_token_id).any()  # padding is really exercised
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)).item()

    def rows(model):
        return torch.tensor(
            [[*_own_answer_logp(model, tok, p["chosen"]), *_own_answer_logp(model, tok, p["rejected"])] for p in PAIRS]
        )

    pol, ref_rows = rows(own), rows(ref)
    assert (pol[:, [0, 2]] - ref_rows[:, [0, 2]]).abs().min() > 1e-3
    expected = _expected_loss(
        loss_type,
        pol,
        ref_rows,
        beta,
        extra.get("label_smoothing", 0.0),
        cfg.simpo_gamma or 0.0,
        extra.get("sft_weight", 0.0),
    )
    assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# The stage


def _stage(tmp_path, inputs: dict, name: str = "dpo", **cfg) -> DPO:
    ctx = StageContext(name=name, dir=tmp_path / name, seed=0, inputs={k: str(v) for k, v in inputs.items()})
    ctx.dir.mkdir(exist_ok=True)
    return DPO(DPOConfig.model_validate(cfg), ctx)


@pytest.fixture(scope="module")
def corruption_prefs(tmp_path_factory, tiny_model_dir):
    """Corruption pairs (reference answer vs a corrupted copy) of five tasks, and the held-out rows."""
    root = tmp_path_factory.mktemp("dpo_prefs")
    tasks = ["sort", "count", "safety", "identity", "reverse"]
    write_jsonl(root / "train.jsonl", rows_of(tasks, 240, seed=11))
    write_jsonl(root / "eval.jsonl", rows_of(tasks, 40, seed=12))
    prefs_dir, _ = _run_prefs(
        root, tiny_model_dir, best_of_n={"enabled": False}, teacher={"enabled": False}, corruption={"per_prompt": 2}
    )
    return {
        "prefs_train": prefs_dir / "train.jsonl",
        "prefs_eval": prefs_dir / "eval.jsonl",
        "eval_data": root / "eval.jsonl",
    }


def test_dpo_stage_raises_heldout_preference_accuracy(tmp_path, tiny_model_dir, corruption_prefs):
    from posttrain.models import load_model

    stage = _stage(
        tmp_path,
        {"model": tiny_model_dir, **corruption_prefs},
        learning_rate=3e-3,
        epochs=2,
        batch_size=16,
        max_length=96,
        eval_steps=20,
        logging_steps=5,
        eval_samples=8,
        gradient_checkpointing=False,
    )
    m = stage.run()
    assert stage.trainer.ref_model is not None  # full fine-tuning: the input model loaded again from its directory
    held = m["heldout"]
    assert held["before"]["implicit_reward_accuracy"] == 0.5  # pi = pi_ref: every reward is 0, ties count half
    # measured: likelihood 0.56 before; implicit reward 0.93 after (likelihood 0.82)
    assert held["after"]["implicit_reward_accuracy"] >= 0.85
    assert held["after"]["implicit_reward_accuracy"] > held["before"]["likelihood_accuracy"] + 0.2, held
    assert held["after"]["implicit_reward_margin"] > 0 and m["train_pairs_too_long"] == 0
    assert m["accuracy_before"]["n"] == m["accuracy_after"]["n"] == 8
    out = tmp_path / "dpo"
    log = json.loads((out / "metrics.json").read_text())["log_history"]
    assert any("rewards/margins" in e and "logps/chosen" in e for e in log) and any("eval_loss" in e for e in log)
    for png in ("loss.png", "rewards.png", "logps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model_dir = out / "model"
    assert not (model_dir / "training_args.bin").exists() and not (out / "checkpoints").exists()
    assert not list(model_dir.glob("*.bin")) and (model_dir / "tokenizer.json").is_file()
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert stage.tokenizer.convert_tokens_to_ids("<end_of_turn>") in gen["eos_token_id"]
    trained = load_model(model_dir, device="cpu").state_dict()
    init = load_model(tiny_model_dir, device="cpu").state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init)


def test_lora_uses_the_adapter_free_base_as_reference_saves_merged_and_resumes(
    tmp_path, tiny_model_dir, corruption_prefs
):
    def stage(**kw) -> DPO:
        return _stage(
            tmp_path,
            {"model": tiny_model_dir, **corruption_prefs},
            lora={"enabled": True, "r": 4, "alpha": 8},
            batch_size=8,
            save_steps=2,
            logging_steps=1,
            learning_rate=1e-2,
            max_length=96,
            eval_samples=0,
            **kw,
        )

    first = stage(max_steps=4, keep_checkpoints=True)
    m = first.run()
    assert first.ref_model is None and first.trainer.ref_model is None  # no second copy of the model
    assert m["steps"] == 4 and "resumed_from_step" not in m
    log = first.trainer.state.log_history
    # the adapters start at zero (B = 0): at step 1 the policy is its base, so every log-ratio is 0
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and log[0]["rewards/margins"] == 0
    assert m["heldout"]["before"]["implicit_reward_accuracy"] == 0.5
    stage_two = stage(max_steps=6)
    second = stage_two.run()  # as if the run had been stopped at step 4
    assert second["resumed_from_step"] == 4 and second["steps"] == 6
    tokens = {e["step"]: e["num_tokens"] for e in stage_two.trainer.state.log_history if "num_tokens" in e}
    assert tokens[4] < tokens[5] < tokens[6]  # TRL's token count goes on from the checkpoint, not from 0
    saved = load_file(tmp_path / "dpo" / "model" / "model.safetensors")
    init = load_file(tiny_model_dir / "model.safetensors")
    assert saved.keys() == init.keys()  # adapters merged away
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[key], init[key])
    assert torch.equal(saved["model.embed_tokens.weight"], init["model.embed_tokens.weight"])


def test_precomputed_or_named_reference(tmp_path, tiny_model_dir, tiny_tokenizer, corruption_prefs):
    from posttrain.models import ModelConfig, build_tiny_model, save_model_dir

    from .conftest import TINY

    def run(name, **cfg) -> tuple[DPO, dict]:
        stage = _stage(
            tmp_path,
            {"model": tiny_model_dir, **corruption_prefs},
            name=name,
            max_steps=2,
            batch_size=8,
            logging_steps=1,
            learning_rate=1e-3,
            max_length=96,
            eval_samples=0,
            **cfg,
        )
        return stage, stage.run()

    stage, m = run("precomputed", precompute_ref_log_probs=True)
    assert stage.ref_model is None and stage.trainer.ref_model is None  # the policy before training scored them
    assert stage.trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    other = save_model_dir(
        build_tiny_model(ModelConfig(family="llama", **TINY), tiny_tokenizer, seed=1),
        tiny_tokenizer,
        tmp_path / "other",
    )
    stage, m = run("named", reference=str(other))
    assert stage.trainer.ref_model is not None
    assert stage.trainer.state.log_history[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    assert m["heldout"]["before"]["implicit_reward_accuracy"] != 0.5  # the input model differs from pi_ref


def test_simpo_stage_needs_no_reference(tmp_path, tiny_model_dir, corruption_prefs):
    stage = _stage(
        tmp_path,
        {"model": tiny_model_dir, **corruption_prefs},
        loss_type="simpo",
        max_steps=3,
        batch_size=8,
        learning_rate=1e-3,
        max_length=96,
        eval_samples=0,
        logging_steps=1,
    )
    m = stage.run()
    assert stage.ref_model is None and stage.cfg.beta == 2.0 and m["steps"] == 3
    before = m["heldout"]["before"]  # SimPO's reward is the likelihood ranking itself
    assert before["implicit_reward_accuracy"] == before["likelihood_accuracy"] != 0.5
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(
        stage.trainer.state.log_history[0]
    )


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"loss_type": "kto"}, "loss_type.*'sigmoid', 'ipo', 'hinge', 'robust' or 'simpo'"),
        ({"loss_type": "simpo", "reference": "sft.model"}, "simpo is reference-free: unset reference"),
        ({"loss_type": "simpo", "precompute_ref_log_probs": True}, "no reference log-probs to precompute"),
        ({"simpo_gamma": 1.0}, "simpo_gamma applies to loss_type simpo only"),
        ({"loss_type": "robust"}, "robust needs label_smoothing > 0"),
        ({"label_smoothing": 0.1}, "label_smoothing applies to loss_type robust only"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing.*less than 0.5"),
        ({"beta": 0}, "beta.*greater than 0"),
        ({"lora": {"enabled": True}, "distributed": {"num_processes": 2, "zero_stage": 3}}, "use zero_stage 2"),
    ],
)
def test_config_mistakes_are_named(cfg, message):
    with pytest.raises(ValidationError, match="(?s)" + message):
        DPOConfig.model_validate(cfg)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "simpo"])
def test_config_survives_the_launchers_round_trip(loss_type):
    """Ranks rebuild the config from its full dump (defaults filled in), which must validate again."""
    extra = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    cfg = DPOConfig.model_validate({"loss_type": loss_type, **extra})
    assert DPOConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert (cfg.beta, cfg.simpo_gamma) == ((2.0, 0.5) if loss_type == "simpo" else (0.1, None))


def test_config_errors_name_the_key_and_line(tmp_path):
    from posttrain.config import ConfigError
    from posttrain.pipeline import load_pipeline

    from .conftest import write_pipeline

    path = write_pipeline(tmp_path, "stages: [dpo]\ndpo:\n  loss_type: simpo\n  label_smoothing: 0.1\n")
    with pytest.raises(ConfigError, match=r"dpo: .*label_smoothing applies to loss_type robust only.*pipeline.yaml:3"):
        load_pipeline(path)


# ----------------------------------------------------------------------------------------------
# In a pipeline: eval compares dpo with sft and ppo; DeepSpeed ranks


def run_prefs_dpo_pipeline(tmp_path, model_dir, **dpo) -> dict:
    """prefs (corruption pairs) -> dpo through the pipeline runner; the dpo stage's metrics."""
    dpo = {
        "model": str(model_dir),
        "eval_data": str(tmp_path / "eval.jsonl"),
        "max_steps": 6,
        "batch_size": 4,
        "max_length": 96,
        "eval_samples": 4,
        "learning_rate": 1e-3,
        **dpo,
    }
    return run_prefs_then(tmp_path, model_dir, "dpo", dpo)


def test_eval_compares_dpo_with_sft_and_ppo(tmp_path, tiny_model_dir):
    from posttrain.pipeline import load_pipeline, run_pipeline

    m = run_prefs_dpo_pipeline(tmp_path, tiny_model_dir)
    assert m["status"] == "ran" and m["steps"] == 6
    run_dir = tmp_path / "run"
    evals = {
        "eval_data": str(tmp_path / "eval.jsonl"),
        "num_prompts": 4,
        "bootstrap_samples": 50,
        "sampling": {"max_new_tokens": 8},
        "memorisation": {"num_examples": 0},
    }
    # sft and ppo stand-ins by path, dpo by reference; then the default: every finished model stage (dpo)
    stand_in = str(tiny_model_dir)
    for models, names in (
        ({"sft": stand_in, "ppo": stand_in, "dpo": "dpo.model"}, ["dpo", "ppo", "sft"]),
        ({}, ["dpo"]),
    ):
        body = (tmp_path / "pipeline.yaml").read_text().replace("stages: [prefs, dpo]", "stages: [prefs, dpo, eval]")
        (tmp_path / "with_eval.yaml").write_text(body + f"eval: {json.dumps({**evals, 'models': models})}\n")
        run_pipeline(load_pipeline(tmp_path / "with_eval.yaml"), only="eval")
        results = json.loads((run_dir / "eval" / "results.json").read_text())
        assert sorted(results["models"]) == names
        assert results["models"]["dpo"]["path"] == str(run_dir / "dpo" / "model")
        if len(names) > 1:
            win_rate = results["models"]["dpo"]["win_rate"]["verifiers"]["win_rate"]
            assert results["baseline"] == "sft" and 0 <= win_rate <= 1


@pytest.mark.slow
def test_dpo_under_deepspeed_zero3_two_processes(tmp_path, tiny_model_dir):
    """prefs -> dpo as 2 ZeRO-3 ranks: one gathered model, trained, with held-out metrics from rank 0."""
    m = run_prefs_dpo_pipeline(tmp_path, tiny_model_dir, distributed={"num_processes": 2, "zero_stage": 3})
    assert m["processes"] == 2 and m["deepspeed_zero_stage"] == 3 and m["steps"] == 6
    assert m["heldout"]["pairs"] > 0 and m["heldout"]["before"]["implicit_reward_accuracy"] == 0.5
    assert m["accuracy_after"]["n"] == 4
    out = tmp_path / "run" / "dpo" / "model"
    saved, init = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert saved.keys() == init.keys() and all(saved[k].shape == init[k].shape for k in init)  # whole, not shards
    assert any(not torch.equal(saved[k], init[k]) for k in init)


def test_quickstart_dpo_config_shares_the_quickstarts_stages_up_to_prefs(monkeypatch):
    from posttrain.pipeline import load_pipeline

    from .conftest import REPO

    monkeypatch.chdir(REPO)
    qs, qs_dpo = load_pipeline("configs/quickstart.yaml"), load_pipeline("configs/quickstart-dpo.yaml")
    assert qs_dpo.stages == ["synth", "filter", "base", "sft", "prefs", "dpo", "eval"]
    for stage in ("synth", "filter", "base", "sft", "prefs"):  # same data, same SFT model, same pairs
        assert getattr(qs_dpo, stage) == getattr(qs, stage), stage
    assert qs_dpo.eval.models == {"sft": "sft.model", "dpo": "dpo.model"}


def test_simpo_with_lora_starts_from_the_same_adapters_for_the_same_seed(tmp_path, tiny_model_dir):
    """The adapters' random init is seeded by the stage seed (TRL's trainers seed before making theirs), so
    two runs with one seed train alike."""
    from posttrain.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    pairs = [(r, p) for r, p in zip(PAIRS, tokenize_pairs(tok, PAIRS))]
    cfg = DPOConfig(loss_type="simpo", batch_size=4, lora={"enabled": True, "r": 4, "alpha": 8})
    adapters = []
    for run in range(2):
        torch.manual_seed(run)  # what came before the stage differs between runs
        model = load_model(tiny_model_dir, device="cpu")
        trainer = build_trainer(model, None, tok, pairs, [], cfg, tmp_path / str(run), seed=0)
        adapters.append({k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_A" in k})
    assert adapters[0] and all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
