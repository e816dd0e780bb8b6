"""Recipes as a graph: a stage kind several times under its own names, inputs by reference NAME.ARTIFACT,
everything checked before any work, --only / --from, and `posttrain show` printing the graph."""

import json

import pytest

from posttrain.cli import main
from posttrain.config import ConfigError
from posttrain.data import write_jsonl
from posttrain.manifest import read_manifest
from posttrain.pipeline import load_pipeline, run_pipeline

from .conftest import make_rows, write_pipeline

TWO_SFTS = """stages: [{{name: first, kind: sft}}, {{name: second, kind: sft}}]
first: {{model: {model}, train_data: {data}, max_steps: 2, batch_size: 8, eval_samples: 0}}
second: {{model: first.model, train_data: {data}, max_steps: 2, batch_size: 8, eval_samples: 0, learning_rate: 5.0e-4}}
"""


def _two_sfts(tmp_path, model_dir, extra: str = "") -> str:
    write_jsonl(tmp_path / "train.jsonl", make_rows(32, seed=1))
    return write_pipeline(tmp_path, TWO_SFTS.format(model=model_dir, data=tmp_path / "train.jsonl") + extra)


def test_a_kind_twice_with_a_reference_between_them(tmp_path, tiny_model_dir):
    cfg = load_pipeline(_two_sfts(tmp_path, tiny_model_dir))
    assert cfg.instances() == [("first", "sft"), ("second", "sft")] and cfg.second.learning_rate == 5e-4
    summary = run_pipeline(cfg)
    assert set(summary) == {"first", "second"} and all(s["status"] == "ran" for s in summary.values())
    second = read_manifest(tmp_path / "run" / "second")
    assert second["inputs"]["model"] == str(tmp_path / "run" / "first" / "model")
    # unchanged: both skipped; a change to the first re-runs both (the second's input changed)
    unchanged = run_pipeline(load_pipeline(_two_sfts(tmp_path, tiny_model_dir)))
    assert all(s["status"] == "skipped" for s in unchanged.values())
    again = run_pipeline(load_pipeline(_two_sfts(tmp_path, tiny_model_dir), ["first.max_steps=3"]))
    assert again["first"]["status"] == again["second"]["status"] == "ran"


BAD = {
    "a reference to a stage that does not exist": (
        "stages: [{name: first, kind: sft}]\nfirst: {model: third.model}\n",
        r"first.model='third.model': no earlier stage produces this artifact",
    ),
    "a reference to a later stage": (
        "stages: [{name: first, kind: sft}, {name: second, kind: sft}]\nfirst: {model: second.model}\n",
        r"first.model='second.model': stage 'second' runs after 'first'; .*list 'second' before 'first' in `stages`",
    ),
    "a name twice": (
        "stages: [{name: first, kind: sft}, {name: first, kind: sft}]\n",
        r"stage name\(s\) listed twice: \['first'\]",
    ),
    "an unknown kind": ("stages: [{name: first, kind: sfx}]\n", r"unknown stage kind 'sfx'"),
    "a pipeline key as a name": ("stages: [{name: seed, kind: sft}]\n", r"stage name 'seed' is a pipeline key"),
    "a typo in a named section": (
        "stages: [{name: first, kind: sft}]\nfirst: {max_step: 3}\n",
        r"first.max_step: unknown key",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_graph_errors_name_the_key_before_any_work(tmp_path, case):
    body, message = BAD[case]
    with pytest.raises(ConfigError, match=message):
        run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))
    assert not (tmp_path / "run" / "first").exists()


def test_missing_rule_function_of_a_later_stage_stops_the_run_before_the_first_stage(tmp_path, tiny_model_dir):
    (tmp_path / "r.py").write_text("def longer(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    extra = (
        f"ppo: {{train_data: {tmp_path / 'train.jsonl'}, scoring: {{rules: "
        f"[{{path: {tmp_path / 'r.py'}, function: shorter}}]}}}}\n"
    )
    path = _two_sfts(tmp_path, tiny_model_dir, extra)
    (tmp_path / "pipeline.yaml").write_text(
        open(path)
        .read()
        .replace(
            "stages: [{name: first, kind: sft}, {name: second, kind: sft}]",
            "stages: [{name: first, kind: sft}, {name: second, kind: sft}, ppo]",
        )
    )
    with pytest.raises(ConfigError, match=r"ppo.scoring.rules.0: .*r.py defines no function 'shorter'"):
        run_pipeline(load_pipeline(tmp_path / "pipeline.yaml"))
    assert not (tmp_path / "run" / "first").exists()
    # a module it imports that is neither installed nor beside it: found without running the file
    (tmp_path / "r.py").write_text(
        "import json\nfrom helpers_not_here import norm\ndef shorter(p, c, **kw):\n    pass\n"
    )
    with pytest.raises(ConfigError, match=r"r.py:2 imports 'helpers_not_here', which is neither installed nor a"):
        run_pipeline(load_pipeline(tmp_path / "pipeline.yaml"))
    (tmp_path / "helpers_not_here.py").write_text("def norm(t):\n    return t\n")  # beside it: the scorer finds it
    from posttrain.graph import check_rule_files

    check_rule_files(load_pipeline(tmp_path / "pipeline.yaml").ppo, "ppo")
    assert not (tmp_path / "run" / "first").exists()


def test_only_and_from_and_show(tmp_path, tiny_model_dir, capsys):
    """The command line in this process (posttrain.cli.main): show, --only and --from."""
    path = _two_sfts(tmp_path, tiny_model_dir)
    assert main(["show", path]) == 0
    assert "#   second (sft) <- model=first.model" in capsys.readouterr().out
    assert main(["run", path, "--only", "second"]) == 1
    assert "second.model='first.model'" in capsys.readouterr().err  # first has not run
    assert main(["run", path, "--only", "first"]) == 0
    assert not (tmp_path / "run" / "second").exists()
    assert main(["run", path, "--only", "second"]) == 0
    started = {n: read_manifest(tmp_path / "run" / n)["started"] for n in ("first", "second")}
    assert main(["run", path, "--from", "second"]) == 0
    assert read_manifest(tmp_path / "run" / "first")["started"] == started["first"]  # before --from: kept
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["second"]["status"] == "ran"
    capsys.readouterr()
    assert main(["run", path, "--from", "third"]) == 1
    assert "--from third: not a stage of this pipeline" in capsys.readouterr().err


def test_a_data_input_may_name_an_earlier_instances_output(tmp_path, tiny_model_dir, capsys):
    """dpo reads the first of two prefs instances (the path form and the mapping form); `show` resolves both
    before any work, and a reference to nothing names the key."""
    write_jsonl(tmp_path / "t.jsonl", make_rows(8))
    data = tmp_path / "t.jsonl"
    body = (
        f"stages: [{{name: pa, kind: prefs}}, {{name: pb, kind: prefs}}, dpo]\n"
        f"pa: {{model: {tiny_model_dir}, train_data: {data}, eval_data: {data}}}\n"
        f"pb: {{model: {tiny_model_dir}, train_data: {data}, eval_data: {data}}}\n"
        f"dpo: {{model: {tiny_model_dir}, prefs_train: pa.prefs_train,"
        f" prefs_eval: {{path: pa.prefs_eval, limit: 4}}}}\n"
    )
    path = write_pipeline(tmp_path, body)
    assert main(["show", path]) == 0
    assert "prefs_train=pa.prefs_train" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"dpo.prefs_train='pc.prefs_train': no earlier stage produces"):
        run_pipeline(load_pipeline(path, ["dpo.prefs_train=pc.prefs_train"]))


def test_a_kind_run_only_under_names(tmp_path, tiny_model_dir, capsys):
    """`--only sft` where the sfts are named first and second, and an `sft:` section they do not read: said,
    not run as a fresh default stage or ignored without a word."""
    path = _two_sfts(tmp_path, tiny_model_dir, "sft: {max_steps: 100}\n")
    assert main(["run", path, "--only", "sft"]) == 1
    assert "--only sft: this pipeline's sft stages are named first, second" in capsys.readouterr().err
    assert main(["show", path]) == 0
    assert "warning: section 'sft' changes nothing: this pipeline's sft stages are named first, second" in (
        capsys.readouterr().err
    )


def test_a_model_to_evaluate_must_be_a_model_directory(tmp_path, tiny_model_dir):
    """A stage's folder (the model is in its model/) is refused when the config is read, not after training."""
    stage_dir = tmp_path / "run" / "sft"
    stage_dir.mkdir(parents=True)
    body = f"stages: [eval]\neval: {{models: {{mine: {tiny_model_dir}, theirs: {stage_dir}}}}}\n"
    with pytest.raises(ConfigError, match=r"eval.models.theirs.*not a Hugging Face model directory"):
        load_pipeline(write_pipeline(tmp_path, body))


def test_a_merge_without_the_latest_model_neither_lists_nor_reads_it(tmp_path, tiny_model_dir, capsys):
    """use_latest_model: false: the latest model is no input of the merge (not in `show`, not fingerprinted)."""
    write_jsonl(tmp_path / "train.jsonl", make_rows(32, seed=1))
    body = TWO_SFTS.format(model=tiny_model_dir, data=tmp_path / "train.jsonl").replace(
        "kind: sft}]\n", "kind: sft}, merge]\n", 1
    )
    body += "merge: {use_latest_model: false, method: linear, models: [first.model, second.model]}\n"
    assert main(["show", write_pipeline(tmp_path, body)]) == 0, capsys.readouterr().err
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("#   merge (merge)"))
    assert line == "#   merge (merge) <- models.0=first.model, models.1=second.model", line
