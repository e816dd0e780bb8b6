"""The release card describes the released model: its lineage is the instances that model descends from (none
after the release, none it does not descend from), its eval table is one that evaluated it before the release,
and its identity comes from the synth instance whatever that instance is named. Tiny pipelines (one-step SFT, a
few greedy tokens of eval) and hand-written manifests; a few seconds in all."""

import json

import yaml

from posttrain.data import write_jsonl
from posttrain.manifest import atomic_write_json, write_manifest
from posttrain.model_card import evaluation_of, lineage_of, recipe_identity
from posttrain.pipeline import load_pipeline, run_pipeline

from .conftest import QUICKSTART_RECIPE, make_rows, write_pipeline

SFT = {"max_steps": 1, "batch_size": 4, "eval_samples": 0}
EVAL = {"num_prompts": 4, "sampling": {"max_new_tokens": 4}, "memorisation": {"num_examples": 0}}


def _recipe(tmp_path, name: str) -> str:
    """The quickstart recipe with another identity name."""
    recipe = yaml.safe_load(open(QUICKSTART_RECIPE).read())
    recipe["identity"]["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _card(run_dir) -> str:
    return (run_dir / "release" / "release" / "README.md").read_text()


def _summary(card: str) -> str:
    return next(line for line in card.splitlines() if "post-trained with posttrain" in line)


# ----------------------------------------------------------------------------------------------
# Lineage and eval table, end to end


def test_card_lineage_is_the_released_models_ancestors_and_its_eval(tmp_path, tiny_model_dir):
    """Bug A, repro 1: release sft_b while later instances made and evaluated other models."""
    stages = ["synth", "base", {"name": "sft_a", "kind": "sft"}, {"name": "sft_b", "kind": "sft"}]
    stages += [{"name": "later", "kind": "merge"}, {"name": "ev_later", "kind": "eval"}, "release"]
    body = {
        "stages": stages,
        "synth": {"recipe": QUICKSTART_RECIPE, "num_train": 24, "num_eval": 6},
        "base": {"path": str(tiny_model_dir)},
        "sft_a": SFT,
        "sft_b": SFT,
        "later": {"method": "linear", "models": ["sft_a.model"]},  # the latest model (sft_b) and sft_a
        "ev_later": {**EVAL, "models": {"later": "later.model"}},
        "release": {"model": "sft_b.model"},
    }
    run_dir = tmp_path / "run"
    run_pipeline(load_pipeline(write_pipeline(tmp_path, yaml.safe_dump(body))))
    card = _card(run_dir)
    assert "post-trained with posttrain (synth -> base -> sft_a -> sft_b)." in _summary(card)
    assert all(f"| {name} | complete |" in card for name in ("synth", "base", "sft_a", "sft_b"))
    assert "| later |" not in card and "ev_later" not in card  # not ancestors; its table is of another model
    assert "No eval stage ran on the released model before this release" in card
    assert "judge it by the evaluation above" not in card

    # An eval of sft_b before the release is the card's table, though another eval ran after it.
    body["stages"] = stages[:-2] + [{"name": "ev_b", "kind": "eval"}, *stages[-2:]]
    body["ev_b"] = {**EVAL, "models": {"b": "sft_b.model", "later": "later.model"}}
    run_pipeline(load_pipeline(write_pipeline(tmp_path, yaml.safe_dump(body))))
    card = _card(run_dir)
    table = (run_dir / "ev_b" / "results.md").read_text().splitlines()
    assert [line for line in table if line.startswith("| b |")][0] in card
    assert "The released weights are the row **b** of the table below." in card
    assert "| ev_b | complete |" in card and "ev_later" not in card and "| later | complete |" not in card
    assert "post-trained with posttrain (synth -> base -> sft_a -> sft_b)." in _summary(card)
    assert "judge it by the evaluation above" in card


def test_card_eval_is_one_that_ran_before_the_release(tmp_path, tiny_model_dir):
    """Bug A, repro 2: ev1 evaluated the released model, ev2 runs after the release; a rerun from the release
    must not pick up ev2's table."""
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, make_rows(6))
    body = {
        "stages": [{"name": "ev1", "kind": "eval"}, "release", {"name": "ev2", "kind": "eval"}],
        "ev1": {**EVAL, "eval_data": str(rows), "models": {"released": str(tiny_model_dir)}},
        "ev2": {**EVAL, "eval_data": str(rows), "models": {"late": str(tiny_model_dir)}},
        "release": {"model": str(tiny_model_dir)},
    }
    cfg = load_pipeline(write_pipeline(tmp_path, yaml.safe_dump(body)))
    run_dir = tmp_path / "run"
    for start in (None, "release"):  # the first run, then ev2 is finished when the release reruns
        run_pipeline(cfg, start=start)
        card = _card(run_dir)
        assert (run_dir / "ev2" / "results.json").is_file()
        table = (run_dir / "ev1" / "results.md").read_text().splitlines()
        assert [line for line in table if line.startswith("| released |")][0] in card
        assert "The released weights are the row **released**" in card
        assert "No eval stage ran" not in card and "| late |" not in card and "ev2" not in card
        assert "| ev1 | complete |" in card and "(ev1" not in _summary(card)  # ev1 measured it, did not make it


# ----------------------------------------------------------------------------------------------
# Lineage and eval choice on hand-written manifests (the runner's records)


def _finished(run, name: str, inputs: dict, config: dict | None = None) -> None:
    write_manifest(run / name, status="complete", kind=name.split("_")[0], inputs=inputs)
    if config is not None:
        (run / name / "config.yaml").write_text(yaml.safe_dump(config))


def test_lineage_follows_recorded_inputs_and_resolved_references(tmp_path):
    """Repro 1's whole graph: manifests' `inputs` (default inputs) and config.yaml (references resolved to
    paths, e.g. merge.models; a data source handed on as JSON) are what each instance read."""
    run = tmp_path / "run"
    order = ["synth", "base", "sft_a", "sft_b", "prefs", "ppo_a", "ppo_b", "merge"]
    kind = {"synth": "train_data", "prefs": "prefs_train"}  # the others: model
    made = {"synth": run / "synth" / "train.jsonl", "prefs": run / "prefs" / "train.jsonl"}
    out = {name: str(made.get(name, run / name / "model")) for name in order}
    # StageContext.artifacts as the runner builds it: NAME.KIND of each earlier finished instance, in order.
    artifacts = {f"{name}.{kind.get(name, 'model')}": out[name] for name in order}
    model, data = out, out["synth"]
    _finished(run, "synth", {})
    _finished(run, "base", {})
    _finished(run, "sft_a", {"model": model["base"], "train_data": json.dumps([{"path": data, "weight": 1}])})
    for name, made_from in [("sft_b", "sft_a"), ("prefs", "sft_b"), ("ppo_a", "sft_b"), ("ppo_b", "ppo_a")]:
        _finished(run, name, {"model": model[made_from]})
    _finished(run, "merge", {}, {"method": "linear", "models": [model["ppo_a"]], "use_latest_model": False})
    results = run / "eval" / "results.json"
    atomic_write_json(results, {"models": {"ppo_b": {"path": model["ppo_b"]}, "merge": {"path": model["merge"]}}})

    assert lineage_of(run, model["sft_b"], artifacts) == ["synth", "base", "sft_a", "sft_b"]
    assert lineage_of(run, model["merge"], artifacts) == ["synth", "base", "sft_a", "sft_b", "ppo_a", "merge"]
    unfinished_sft_a = {key: path for key, path in artifacts.items() if not key.startswith("sft_a.")}
    assert lineage_of(run, model["sft_b"], unfinished_sft_a) == ["sft_b"]  # not among the earlier finished ones
    assert lineage_of(run, tmp_path / "elsewhere", artifacts) == []
    assert evaluation_of(model["sft_b"], {"eval": str(results)}) is None  # its table is of other models
    assert evaluation_of(model["merge"], {"eval": str(results)}) == ("eval", "merge")


# ----------------------------------------------------------------------------------------------
# Identity


def test_named_synth_gives_its_identity_to_eval_and_release(tmp_path, tiny_model_dir):
    """Bug B: `{name: data, kind: synth}` keeps its recipe in section `data`; eval and release read it there."""
    body = {
        "stages": [{"name": "data", "kind": "synth"}, "base", "eval", "release"],
        "data": {"recipe": _recipe(tmp_path, "Acme-Bot"), "num_train": 24, "num_eval": 6},
        "base": {"path": str(tiny_model_dir)},
        "eval": {**EVAL, "models": {"base": "base.model"}},
    }
    summary = run_pipeline(load_pipeline(write_pipeline(tmp_path, yaml.safe_dump(body))))
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "eval" / "results.json").read_text())["release_name"] == "Acme-Bot"
    assert summary["release"]["name"] == "Acme-Bot"
    card = _card(run_dir)
    assert "\n# Acme-Bot\n" in card and "post-trained with posttrain (data -> base)." in _summary(card)


def test_identity_rule_with_several_synth_instances(tmp_path):
    """The last synth the model descends from; else the last before the asking stage; else the pipeline's last."""
    names = {"teacher_data": "Teacher-Bot", "data": "Acme-Bot", "late_data": "Late-Bot"}
    body = {name: {"recipe": _recipe(tmp_path, who), "num_train": 10} for name, who in names.items()}
    body["stages"] = [{"name": "teacher_data", "kind": "synth"}, {"name": "data", "kind": "synth"}, "release"]
    body["stages"].append({"name": "late_data", "kind": "synth"})
    cfg = load_pipeline(write_pipeline(tmp_path, yaml.safe_dump(body)))
    assert recipe_identity(cfg)["name"] == "Late-Bot"
    assert recipe_identity(cfg, before="release")["name"] == "Acme-Bot"
    assert recipe_identity(cfg, before="release", lineage=["teacher_data", "base"])["name"] == "Teacher-Bot"
    assert recipe_identity(cfg, before="data") == {"name": "Teacher-Bot", "maker": "the posttrain authors"}
    assert recipe_identity(cfg, before="teacher_data") == {}

    plain = load_pipeline(write_pipeline(tmp_path, f"stages: [synth]\nsynth: {{recipe: {QUICKSTART_RECIPE}}}\n"))
    assert recipe_identity(plain)["name"] == "Posttrain-Tiny"


def test_the_card_gives_no_vllm_snippet_for_a_family_vllm_cannot_run():
    from posttrain.model_card import usage_snippets

    assert "from vllm import LLM, SamplingParams" in usage_snippets("m", "gemma2")
    recurrent = "\n".join(usage_snippets("m", "recurrent_gemma"))
    assert "from vllm" not in recurrent and "vLLM does not run RecurrentGemma models" in recurrent
    assert "AutoModelForCausalLM.from_pretrained(path)" in recurrent
