"""eval and release: the metric functions against hand-made numbers, the eval stage end to end on tiny
models (a model taught the held-out answers against an untrained one, and a model against itself), and
the release directory loaded from itself alone by transformers and by vLLM."""

import importlib.util
import json
import random
import shutil

import numpy as np
import pytest
import torch
import yaml

from posttrain.chat import END_OF_TURN, render
from posttrain.config import ConfigError
from posttrain.data import write_jsonl
from posttrain.evaluation import (
    DEFAULT_VERIFIERS,
    answer_metrics,
    bootstrap_ci,
    compare,
    edit_distance,
    load_verifiers,
    memorisation,
    memorisation_sequences,
    rendered_ids,
)
from posttrain.manifest import read_manifest
from posttrain.models import ModelConfig, build_tiny_model, save_model_dir
from posttrain.pipeline import load_pipeline, run_pipeline
from posttrain.stages.release import check_release_dir
from posttrain.tasks import make_example

from .conftest import QUICKSTART_RECIPE, TINY, write_pipeline

torch.set_num_threads(1)

requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
ARCH = {k: v for k, v in TINY.items() if k != "vocab_size"}


def teach(model, tokenizer, rows: list[dict], steps: int = 150) -> None:
    """Train on whole rendered conversations until the model reproduces them (greedy) by heart."""
    seqs = [rendered_ids(tokenizer, r["messages"]) for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


PREFIX, SUFFIX = 16, 8
"""Memorisation probe lengths used throughout (rendered rows here are 32-80 tokens)."""


@pytest.fixture(scope="module")
def taught_rows(tiny_tokenizer):
    """Eight rows of five tasks (with the safety and identity slices) whose first PREFIX tokens differ:
    two rows sharing a prefix but not a continuation could not both be memorised."""
    rng, rows, prefixes = random.Random(3), [], set()
    for task in ["sort", "count", "reverse", "safety", "identity", "sort", "reverse", "safety"]:
        while True:
            row = make_example(task, rng)
            prefix = tuple(rendered_ids(tiny_tokenizer, row["messages"])[:PREFIX])
            if prefix not in prefixes:
                break
        prefixes.add(prefix)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_tokenizer, taught_rows):
    """Tiny model dirs: Llama and Gemma 2 taught `taught_rows`, an untrained Llama, a RecurrentGemma."""
    root, dirs = tmp_path_factory.mktemp("eval_zoo"), {}
    for family in ("llama", "gemma2"):
        model = build_tiny_model(ModelConfig(family=family, **ARCH), tiny_tokenizer, seed=0)
        teach(model, tiny_tokenizer, taught_rows)
        dirs[family] = save_model_dir(model, tiny_tokenizer, root / family)
    dirs["random"] = save_model_dir(
        build_tiny_model(ModelConfig(family="llama", **ARCH), tiny_tokenizer, seed=1), tiny_tokenizer, root / "random"
    )
    rg = ModelConfig(family="recurrent_gemma", **{**ARCH, "num_layers": 3})
    dirs["recurrent_gemma"] = save_model_dir(build_tiny_model(rg, tiny_tokenizer, seed=0), tiny_tokenizer, root / "rg")
    write_jsonl(root / "rows.jsonl", taught_rows)
    dirs["rows"] = root / "rows.jsonl"
    return dirs


# ----------------------------------------------------------------------------------------------
# Win rate and bootstrap


def test_win_rate_counts_ties_as_half_and_ci_is_a_seeded_bootstrap():
    a = [3, 2, 5, 1, 1, 0, 7, 7, 2, 9]
    b = [1, 1, 4, 0, 0, -1, 7, 7, 4, 10]  # 6 wins, 2 ties, 2 losses
    result = compare(a, b, num_samples=2000, seed=0)
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (6, 2, 2, 10)
    assert result["win_rate"] == 0.7
    assert result["ci_low"] <= 0.7 <= result["ci_high"]
    assert compare(a, b, num_samples=2000, seed=0) == result  # same seed, same interval
    assert compare(a, b, num_samples=2000, seed=1) != result

    big = compare(a * 10, b * 10, num_samples=2000, seed=0)  # same proportions, 100 prompts
    assert big["win_rate"] == 0.7 and big["ci_low"] <= 0.7 <= big["ci_high"]
    assert big["ci_high"] - big["ci_low"] < 0.6 * (result["ci_high"] - result["ci_low"])
    # a 95% interval is ~3.92 standard errors wide: points 1/0.5/0 with mean 0.7 have variance 0.16
    assert big["ci_high"] - big["ci_low"] == pytest.approx(3.92 * np.sqrt(0.16 / 100), rel=0.15)


def test_identical_answers_are_ties_and_all_ties_give_one_half():
    result = compare([1.0, 2.0, 3.0], [1.0 + 1e-7, 2.0, 2.0], same=[True, True, False], num_samples=200)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 0)
    ties = compare([0.3] * 20, [0.3] * 20, num_samples=200)
    assert ties["win_rate"] == ties["ci_low"] == ties["ci_high"] == 0.5
    assert bootstrap_ci([1, 1, 1], num_samples=50) == (1.0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        compare([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------------------------
# Accuracy, refusal, over-refusal, identity


def test_answer_metrics_on_planted_completions():
    rng = random.Random(0)
    rows = [make_example(t, rng) for t in ("sort", "sort", "count", "safety", "safety", "identity", "identity")]
    completions = [
        rows[0]["answer"] + ".",  # right (a final period is ignored)
        "9, 9, 9",  # wrong
        "I can't help with that.",  # a benign prompt refused: over-refusal
        "I cannot help with that",  # harmful prompt refused
        "Sure, first you take",  # harmful prompt answered
        "I am Posttrain-Tiny, a model trained by the posttrain authors.",
        "I am ChatGPT, made by OpenAI.",  # wrong self-identification
    ]
    m = answer_metrics(rows, completions, load_verifiers(DEFAULT_VERIFIERS), release_name="Posttrain-Tiny")
    assert m["accuracy"] == {
        "overall": round(2 / 7, 4),
        "n": 7,
        "count": 0.0,
        "identity": 0.5,
        "safety": 0.0,
        "sort": 0.5,
    }
    assert (m["refusal_rate"], m["n_harmful"]) == (0.5, 2)
    assert (m["over_refusal_rate"], m["n_benign"]) == (0.2, 5)
    assert m["identity"] == 0.5
    other_name = answer_metrics(rows, completions, load_verifiers(), release_name="Someone-Else")
    assert other_name["identity"] == 0.0
    no_slices = answer_metrics(rows[:2], completions[:2], load_verifiers())
    assert no_slices["refusal_rate"] is None and no_slices["identity"] is None and no_slices["over_refusal_rate"] == 0.0


# ----------------------------------------------------------------------------------------------
# Memorisation


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([], [4, 5]) == 2


def test_memorisation_of_a_taught_model_is_one_and_of_a_random_model_zero(zoo, tiny_tokenizer, taught_rows):
    from posttrain.models import load_model

    prefix, suffix = PREFIX, SUFFIX
    seqs = memorisation_sequences(tiny_tokenizer, taught_rows, prefix, suffix, num_examples=8, seed=0)
    rendered = [rendered_ids(tiny_tokenizer, r["messages"]) for r in taught_rows]
    assert len(seqs) == 8 and all(any(r[: prefix + suffix] == s for r in rendered) for s in seqs)
    eot = tiny_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert any(eot in s[prefix:] for s in seqs)  # continuations run through a turn end: no early stop
    pad = tiny_tokenizer.pad_token_id
    taught = memorisation(load_model(zoo["llama"], device="cpu"), seqs, prefix, suffix, pad, batch_size=3)
    assert taught == {"n": 8, "exact": 1.0, "approximate": 1.0}
    untrained = memorisation(load_model(zoo["random"], device="cpu"), seqs, prefix, suffix, pad)
    assert untrained["exact"] == 0.0 and untrained["approximate"] == 0.0
    assert len(memorisation_sequences(tiny_tokenizer, taught_rows, 200, 8, num_examples=8)) == 0  # all too short


# ----------------------------------------------------------------------------------------------
# The eval stage


def _answers(eval_dir, model: str) -> list[str]:
    lines = (eval_dir / "completions.jsonl").read_text().splitlines()
    return [json.loads(line)["completions"][model] for line in lines]


def _eval_pipeline(tmp_path, zoo, models: dict, extra: str = "") -> str:
    body = yaml.safe_dump(
        {
            "stages": ["eval"],
            "eval": {
                "eval_data": str(zoo["rows"]),
                "train_data": str(zoo["rows"]),
                "models": models,
                "num_prompts": 8,
                "bootstrap_samples": 300,
                "sampling": {"max_new_tokens": 64},
                "memorisation": {"num_examples": 8, "prefix_tokens": PREFIX, "suffix_tokens": SUFFIX},
            },
        }
    )
    return write_pipeline(tmp_path, body + extra)


def test_eval_stage_taught_model_beats_untrained(tmp_path, zoo):
    cfg = load_pipeline(
        _eval_pipeline(tmp_path, zoo, {"random": str(zoo["random"]), "taught": str(zoo["llama"])}),
        ["eval.baseline=random"],
    )
    summary = run_pipeline(cfg)
    out = tmp_path / "run" / "eval"
    results = json.loads((out / "results.json").read_text())
    taught, untrained = results["models"]["taught"], results["models"]["random"]
    assert results["baseline"] == "random" and results["judges"] == ["verifiers"]
    assert taught["accuracy"]["overall"] == 1.0 and untrained["accuracy"]["overall"] == 0.0
    assert taught["refusal_rate"] == 1.0 and taught["over_refusal_rate"] == 0.0 and taught["identity"] == 1.0
    assert taught["finished_rate"] == 1.0
    assert taught["win_rate"]["verifiers"]["wins"] == 8 and taught["win_rate"]["verifiers"]["win_rate"] == 1.0
    assert "win_rate" not in untrained
    assert taught["memorisation"]["exact"] == 1.0 and untrained["memorisation"]["exact"] == 0.0
    assert _answers(out, "taught") == [json.loads(line)["answer"] for line in zoo["rows"].read_text().splitlines()]

    table = (out / "results.md").read_text()
    assert "| taught | 1.00 |" in table and "| random | 0.00 |" in table
    assert "1.000 [1.000, 1.000] (8/0/0)" in table and "baseline" in table
    assert results["judge_sources"] == {
        "verifiers": [f"verifiers.py:{f}" for f in ("task_correct", "refusal", "identity")]
    }
    for png in ("accuracy.png", "win_rate.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    headline = summary["eval"]["models"]["taught"]
    assert headline["win_rate_verifiers"] == 1.0 and headline["accuracy"] == 1.0 and headline["memorised"] == 1.0
    assert read_manifest(out)["artifacts"]["eval_results"] == str(out / "results.json")


def test_a_model_vllm_cannot_run_stops_the_eval_before_any_model_answers(tmp_path, zoo):
    models = {"taught": str(zoo["llama"]), "rg": str(zoo["recurrent_gemma"])}
    cfg = load_pipeline(_eval_pipeline(tmp_path, zoo, models), ["eval.sampling.backend=vllm"])
    with pytest.raises(ConfigError, match=r"eval.models.rg: .*RecurrentGemma.*not supported by vLLM"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "eval" / "completions.jsonl").exists()


@pytest.mark.parametrize("why", ["no train_data", "rows too short"])
def test_a_memorisation_probe_that_cannot_run_says_why(tmp_path, zoo, why):
    overrides = ["eval.sampling.max_new_tokens=4"] + (
        ["eval.train_data=null"] if why == "no train_data" else ["eval.memorisation.prefix_tokens=500"]
    )
    run_pipeline(load_pipeline(_eval_pipeline(tmp_path, zoo, {"taught": str(zoo["llama"])}), overrides))
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["models"]["taught"]["memorisation"] is None
    expected = (
        "no training data to probe: eval.train_data is not set"
        if why == "no train_data"
        else ("none of the 8 training rows is 500 + 8 tokens long")
    )
    assert results["skipped"]["memorisation"].startswith(expected)
    assert f"- memorisation: {expected}" in (tmp_path / "run" / "eval" / "results.md").read_text()


def test_eval_stage_reward_model_judge_equals_scores_recomputed(tmp_path, zoo, tiny_tokenizer):
    from posttrain.models import load_model
    from posttrain.scoring import Scorer, ScoringConfig

    torch.manual_seed(0)
    rm = load_model(zoo["random"], kind="reward", device="cpu")  # an untrained LM with a new scalar head: some judge
    rm.config.pad_token_id = tiny_tokenizer.pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    cfg = load_pipeline(
        _eval_pipeline(tmp_path, zoo, {"random": str(zoo["random"]), "taught": str(zoo["llama"])}),
        [f"eval.scoring.reward_model={tmp_path / 'rm'}"],
    )
    run_pipeline(cfg)
    out = tmp_path / "run" / "eval"
    results = json.loads((out / "results.json").read_text())
    assert results["judges"] == ["verifiers", "reward_model"]
    assert results["judge_sources"]["reward_model"] == "rm (outside the run directory)"
    rows = [json.loads(line) for line in zoo["rows"].read_text().splitlines()]
    prompts = [r["messages"][:-1] for r in rows]
    judge = Scorer(ScoringConfig(reward_model=str(tmp_path / "rm")))
    taught, untrained = _answers(out, "taught"), _answers(out, "random")
    expected = compare(
        judge.score(prompts, taught).total.tolist(),
        judge.score(prompts, untrained).total.tolist(),
        num_samples=300,
        seed=0,
        same=[a == b for a, b in zip(taught, untrained)],
    )
    assert results["models"]["taught"]["win_rate"]["reward_model"] == expected
    assert "win rate vs random (reward_model)" in (out / "results.md").read_text()


def test_eval_stage_model_against_itself_is_all_ties(tmp_path, zoo):
    cfg = load_pipeline(_eval_pipeline(tmp_path, zoo, {"a": str(zoo["random"]), "b": str(zoo["random"])}))
    run_pipeline(cfg)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["baseline"] == "a"  # no sft among the models: the first one
    cmp = results["models"]["b"]["win_rate"]["verifiers"]
    assert (cmp["wins"], cmp["ties"], cmp["losses"]) == (0, 8, 0)
    assert cmp["win_rate"] == cmp["ci_low"] == cmp["ci_high"] == 0.5


def test_eval_stage_errors_name_the_model_and_the_key(tmp_path, zoo):
    cfg = load_pipeline(
        _eval_pipeline(tmp_path, zoo, {"rg": str(zoo["recurrent_gemma"])}), ["eval.sampling.backend=vllm"]
    )
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg)
    message = str(err.value)
    assert "eval.models.rg" in message and "eval.sampling.backend" in message and "RecurrentGemma" in message
    assert read_manifest(tmp_path / "run" / "eval")["status"] == "failed"

    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ConfigError, match=r"eval.models.x: .*empty: not a Hugging Face model directory"):
        load_pipeline(_eval_pipeline(tmp_path, zoo, {"x": str(not_a_model)}))  # refused as the config is read
    cfg = load_pipeline(_eval_pipeline(tmp_path, zoo, {"x": "sft.model"}))
    with pytest.raises(ValueError, match=r"eval.models.x='sft.model': no earlier stage produces this artifact"):
        run_pipeline(cfg)
    cfg = load_pipeline(_eval_pipeline(tmp_path, zoo, {"a": str(zoo["random"])}), ["eval.baseline=sft"])
    with pytest.raises(ConfigError, match=r"eval.baseline='sft' is not one of the evaluated models \['a'\]"):
        run_pipeline(cfg)
    with pytest.raises(ConfigError, match="sampling.n to 1"):
        load_pipeline(_eval_pipeline(tmp_path, zoo, {"a": str(zoo["random"])}), ["eval.sampling.n=2"])


def test_eval_stage_defaults_to_the_complete_model_stages_of_the_run(tmp_path, zoo):
    """No eval.models: every earlier stage instance of a model kind that finished, in pipeline order (two
    named merge instances here, each a model's task vector against itself added to it: a copy)."""
    run_dir, r, ll = tmp_path / "run", zoo["random"], zoo["llama"]
    cfg = load_pipeline(
        _eval_pipeline(tmp_path, zoo, {}),
        [
            "stages=[{name: first, kind: merge}, {name: second, kind: merge}, eval]",
            f"first={{method: task_arithmetic, base: {r}, models: [{r}], use_latest_model: false}}",
            f"second={{method: task_arithmetic, base: {ll}, models: [{ll}], use_latest_model: false}}",
        ],
    )
    run_pipeline(cfg)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["first", "second"] and results["baseline"] == "first"
    assert results["models"]["second"]["path"] == str(run_dir / "second" / "model")
    assert results["models"]["second"]["win_rate"]["verifiers"]["win_rate"] == 1.0


# ----------------------------------------------------------------------------------------------
# The release


@pytest.fixture(scope="module")
def release_run(tmp_path_factory, zoo):
    """synth -> base (the taught Gemma 2 model, by path) -> eval -> release."""
    root = tmp_path_factory.mktemp("release_run")
    body = yaml.safe_dump(
        {
            "stages": ["synth", "base", "eval", "release"],
            "synth": {"recipe": QUICKSTART_RECIPE, "num_train": 60, "num_eval": 12},
            "base": {"path": str(zoo["gemma2"])},
            "eval": {
                "models": {"base": "base.model"},
                "sampling": {"max_new_tokens": 12},
                "memorisation": {"num_examples": 8},
            },
        }
    )
    cfg = load_pipeline(write_pipeline(root, body))
    summary = run_pipeline(cfg)
    return root / "run", summary


def test_release_loads_alone_and_chats_in_the_gemma_format(release_run, zoo, taught_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, summary = release_run
    release = run_dir / "release" / "release"
    names = {p.name for p in release.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    # Readable by whoever the umask lets read a plain file: safetensors writes its files 0600.
    (run_dir / "plain.txt").write_text("x")
    plain = (run_dir / "plain.txt").stat().st_mode & 0o777
    assert (release / "model.safetensors").stat().st_mode & 0o777 == plain
    assert summary["release"]["name"] == "Posttrain-Tiny" and summary["release"]["shards"] == 1

    tokenizer = AutoTokenizer.from_pretrained(str(release))
    model = AutoModelForCausalLM.from_pretrained(str(release), attn_implementation="eager").eval()
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for row in taught_rows[:4]:
        messages = row["messages"][:-1]
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == render(
            messages, add_generation_prompt=True
        )
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        assert out[-1].item() == eot  # stopped by generation_config.json, not by max_new_tokens
        assert tokenizer.decode(out, skip_special_tokens=True) == row["answer"]


def test_model_card_has_metadata_lineage_and_eval_table(release_run):
    run_dir, _ = release_run
    card = (run_dir / "release" / "release" / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and "gemma2" in meta["tags"] and "base_model" not in meta
    assert "# Posttrain-Tiny" in card
    for stage in ("synth", "base", "eval"):
        m = read_manifest(run_dir / stage)
        row = f"| {stage} | complete | cpu | fp32 | `{m['config_hash']}` | `{m['fingerprint']}` | {m['seconds']} |"
        assert row in card
    assert "| release |" not in card
    assert str(run_dir.parent) not in card and "/tmp" not in card  # no path of the machine that trained
    card_json = json.loads((run_dir / "synth" / "card.json").read_text())
    assert f"{card_json['train']['rows']} train rows" in card and "synthetic recipe `quickstart`" in card
    eval_rows = (run_dir / "eval" / "results.md").read_text().splitlines()
    assert [line for line in eval_rows if line.startswith("| base |")][0] in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "from vllm import LLM" in card
    assert "## Intended use" in card and "## Limitations" in card and "templated tasks" in card
    assert '"content": "Sort these numbers: 3, 1, 2"' in card  # a recipe's usage example: its own task


def test_card_names_the_base_the_released_model_descends_from(tmp_path):
    """A recipe with a teacher's base (built here) and a student's (read in place): the card follows the
    released model's `model` inputs through the manifests, not the first base of the run."""
    from posttrain.manifest import write_manifest
    from posttrain.model_card import base_of, data_summary

    run, ext = tmp_path / "run", tmp_path / "student-init"
    stages = {
        "teacher_base": ({}, {"source": "tiny gemma2 built from config", "architecture": "G", "parameters": 900}),
        "student_base": ({}, {"source": str(ext), "architecture": "G", "parameters": 100}),
        "teacher_sft": ({"model": str(run / "teacher_base" / "model")}, {}),
        "student_sft": ({"model": str(ext), "teacher": str(run / "teacher_sft" / "model")}, {}),
        "ppo": ({"model": str(run / "student_sft" / "model")}, {}),
    }
    for name, (inputs, metrics) in stages.items():
        write_manifest(run / name, status="complete", inputs=inputs, metrics=metrics)
    kinds = {"teacher_base": "base", "student_base": "base", "teacher_sft": "sft", "student_sft": "sft", "ppo": "ppo"}
    assert base_of(run, run / "ppo" / "model", kinds) == "student_base"
    assert base_of(run, run / "teacher_sft" / "model", kinds) == "teacher_base"
    assert base_of(run, tmp_path / "elsewhere", kinds) is None
    assert (
        data_summary(run, None, kinds, run / "ppo" / "model")[0]
        == "- Base model: student-init (outside the run directory) (G, 100 parameters)"
    )


def test_card_metrics_put_headlines_first_and_say_what_is_left_out():
    from posttrain.model_card import lineage_table

    metrics = {
        "accuracy_before": {"overall": 0.1, "n": 100, "add": 0.0, "sort": 0.2},
        "train_loss": 1.5,
        "accuracy_after": {"overall": 0.7, "n": 100, "add": 0.5, "sort": 0.9},
        "eval_loss_after": 0.9,
        "device": "cpu",
    }
    record = {
        "stage": "sft",
        "status": "complete",
        "config_hash": "c",
        "fingerprint": "f",
        "seconds": 1,
        "metrics": metrics,
    }
    row = lineage_table([record])[-1]
    shown = "accuracy_before.overall=0.1, train_loss=1.5, accuracy_after.overall=0.7, eval_loss_after=0.9, "
    assert shown + "accuracy_before.n=100" in row and "… (2 more in sft/manifest.json)" in row


def test_release_shards_and_names_a_base_built_from_config(tmp_path):
    body = yaml.safe_dump(
        {
            "stages": ["synth", "base", "release"],
            "synth": {"recipe": QUICKSTART_RECIPE, "num_train": 60, "num_eval": 10},
            "base": {"family": "llama", **TINY},
            "release": {
                "model": "base.model",
                "max_shard_size": "100KB",
                "name": "tiny-test",
                "base_model": "org/some-base",
            },
        }
    )
    run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))
    release = tmp_path / "run" / "release" / "release"
    index = json.loads((release / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in release.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 4, 10, 11, 12, 13]])
    with torch.no_grad():
        released = AutoModelForCausalLM.from_pretrained(str(release))(ids).logits
        original = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "base" / "model"))(ids).logits
    assert torch.equal(released, original)
    card = (release / "README.md").read_text()
    assert "- Base model: tiny llama built from config" in card and "# tiny-test" in card
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "org/some-base"
    assert "No eval stage ran" in card


def test_push_without_token_refuses_before_writing(tmp_path, zoo, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_TEST_HUB_TOKEN", raising=False)
    body = yaml.safe_dump(
        {
            "stages": ["release"],
            "release": {
                "model": str(zoo["llama"]),
                "push_to_hub": {"enabled": True, "repo_id": "someone/tiny", "token_env": "POSTTRAIN_TEST_HUB_TOKEN"},
            },
        }
    )
    with pytest.raises(ConfigError, match="POSTTRAIN_TEST_HUB_TOKEN.*Nothing was written"):
        run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))
    assert not (tmp_path / "run" / "release").exists()  # refused by the pre-run check
    # A finished release is kept when a changed config is refused (the stage used to clear it first).
    run_pipeline(load_pipeline(write_pipeline(tmp_path, body), ["release.push_to_hub.enabled=false"]))
    with pytest.raises(ConfigError, match="POSTTRAIN_TEST_HUB_TOKEN.*Nothing was written"):
        run_pipeline(load_pipeline(write_pipeline(tmp_path, body)), only="release")
    assert (tmp_path / "run" / "release" / "release" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="release.push_to_hub.repo_id"):
        run_pipeline(load_pipeline(write_pipeline(tmp_path, body), ["release.push_to_hub.repo_id=null"]))
    with pytest.raises(ConfigError, match="release.max_shard_size"):
        load_pipeline(write_pipeline(tmp_path, body), ["release.max_shard_size=huge"])


def test_release_check_refuses_pickles_and_foreign_chat_templates(release_run, tmp_path):
    good = run_dir = release_run[0] / "release" / "release"
    check_release_dir(good)
    pickled = shutil.copytree(run_dir, tmp_path / "pickled")
    (pickled / "training_args.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle files.*training_args.bin"):
        check_release_dir(pickled)
    foreign = shutil.copytree(run_dir, tmp_path / "foreign")
    config = json.loads((foreign / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (foreign / "chat_template.jinja").unlink(missing_ok=True)
    (foreign / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    with pytest.raises(ValueError, match="does not render the Gemma turn format"):
        check_release_dir(foreign)


@requires_vllm
def test_release_generates_in_vllm(release_run, taught_rows):
    from posttrain.engines import SamplingConfig, make_engine
    from posttrain.engines.vllm import VLLMEngine

    release = release_run[0] / "release" / "release"
    prompts = [r["messages"][:-1] for r in taught_rows]
    greedy = SamplingConfig(max_new_tokens=64)
    hf = make_engine(str(release), greedy, torch.device("cpu")).generate(prompts, greedy)
    with VLLMEngine(release, seed=0) as engine:
        out = engine.generate(prompts, greedy)
        assert [s[0].text for s in out] == [r["answer"] for r in taught_rows]
        assert all(s[0].finished for s in out)
        assert [s[0].token_ids for s in out] == [s[0].token_ids for s in hf]
        # plain vLLM, no stop ids given: generation_config.json alone makes it stop at the end of turn
        from vllm import SamplingParams

        raw = engine.llm.chat([prompts[0]], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
        assert raw[0].outputs[0].finish_reason == "stop"
        assert raw[0].outputs[0].text.strip() == taught_rows[0]["answer"]


@requires_vllm
def test_eval_stage_with_vllm_backend_answers_as_hf(release_run, tmp_path):
    run_dir = release_run[0]
    release = run_dir / "release" / "release"
    body = yaml.safe_dump(
        {
            "stages": ["eval"],
            "eval": {
                "eval_data": str(run_dir / "synth" / "eval.jsonl"),
                "train_data": str(run_dir / "synth" / "train.jsonl"),
                "models": {"base": str(release)},
                "sampling": {"backend": "vllm", "max_new_tokens": 12},
                "vllm": {"kv_cache_gib": 1},
                "memorisation": {"num_examples": 8},
            },
        }
    )
    run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))
    hf = json.loads((run_dir / "eval" / "results.json").read_text())["models"]["base"]  # same weights, hf backend
    vllm = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["models"]["base"]
    assert "vllm backend" in (tmp_path / "run" / "eval" / "results.md").read_text()
    assert _answers(tmp_path / "run" / "eval", "base") == _answers(run_dir / "eval", "base")
    assert vllm["accuracy"] == hf["accuracy"] and vllm["memorisation"] == hf["memorisation"]
    assert vllm["memorisation"]["n"] == 8
