"""synth recipes: task parameters checked against the generators before any stage runs, and a teacher's empty
answers dropped and counted on the recipe path as on the prompts path."""

from __future__ import annotations

import json
import random

import pytest

import posttrain.stages.synth as synth_module
from posttrain.cli import main as cli_main
from posttrain.config import ConfigError
from posttrain.data import read_rows
from posttrain.engines import Sample
from posttrain.pipeline import load_pipeline, run_pipeline
from posttrain.stages import StageContext
from posttrain.stages.synth import Synth, SynthConfig, load_recipe
from posttrain.tasks import TASKS, make_example, param_errors, task_params

from .conftest import QUICKSTART_RECIPE, write_pipeline


def _pipeline(tmp_path, recipe_text: str, **synth) -> str:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    settings = {"recipe": str(recipe), "num_train": 10, "num_eval": 2, **synth}
    return write_pipeline(tmp_path, f"stages: [synth]\nsynth: {json.dumps(settings)}\n")


# ----------------------------------------------------------------------------------------------
# parameters: derived from the generators, checked when the config is


def test_parameters_are_the_generators_own():
    assert task_params("add") == {"max_value": 20}
    assert task_params("reverse") == {"min_len": 3, "max_len": 4} and task_params("count") == {}
    assert set(task_params("identity")) == {"name", "maker"} and set(task_params("safety")) == {"refusal"}
    with pytest.raises(TypeError, match="max_valu"):  # no catch-all keyword swallows a typo
        make_example("add", random.Random(0), max_valu=3)


def test_the_shipped_recipe_and_every_default_are_valid():
    assert load_recipe(QUICKSTART_RECIPE).name == "quickstart"
    assert all(param_errors(task, {}) == {} for task in TASKS)


@pytest.mark.parametrize(
    "task, params, key, message",
    [
        ("add", {"max_valu": 3}, "max_valu", "unknown parameter of task 'add' (its parameters: max_value)"),
        ("count", {"max_len": 3}, "max_len", "unknown parameter of task 'count' (it takes no parameters)"),
        ("sort", {"min_len": 5, "max_len": 2}, "max_len", "min_len 5 > max_len 2: an empty range"),
        ("reverse", {"min_len": 5}, "min_len", "min_len 5 > max_len 4 (its default): an empty range"),
        ("add", {"max_value": -1}, "max_value", "must be at least 0 (got -1)"),
        ("sort", {"min_len": 0}, "min_len", "must be at least 1 (got 0)"),
        ("reverse", {"max_len": 27}, "max_len", "must be at most 26 (got 27)"),
        ("add", {"max_value": "9"}, "max_value", "expected int like 20 (got '9')"),
        ("sort", {"max_len": True}, "max_len", "expected int like 4 (got True)"),
        ("safety", {"refusal": " "}, "refusal", "must not be empty"),
    ],
)
def test_param_errors_name_the_key(task, params, key, message):
    assert param_errors(task, params) == {key: message}


def test_show_reports_unknown_and_empty_range_params_with_file_task_and_line(tmp_path, capsys):
    recipe = "tasks:\n  - task: add\n    params: {max_valu: 3}\n  - task: sort\n    params: {min_len: 5, max_len: 2}\n"
    path = _pipeline(tmp_path, recipe)
    assert cli_main(["show", path]) == 2
    err = capsys.readouterr().err
    where = tmp_path / "recipe.yaml"
    assert f"synth.recipe: invalid recipe {where}" in err
    assert f"tasks.0.params.max_valu: unknown parameter of task 'add' (its parameters: max_value)  [{where}:3]" in err
    assert f"tasks.1.params.max_len: min_len 5 > max_len 2: an empty range  [{where}:5]" in err


def test_identity_and_refusal_are_checked_as_the_generators_parameters(tmp_path, capsys):
    path = _pipeline(tmp_path, "identity: {nmae: Tiny}\nrefusal: ''\ntasks:\n  - task: sort\n")
    assert cli_main(["show", path]) == 2
    err = capsys.readouterr().err
    assert "identity.nmae: unknown parameter of task 'identity' (its parameters: name, maker)" in err
    assert f"refusal: must not be empty  [{tmp_path / 'recipe.yaml'}:2]" in err


def test_a_bad_recipe_stops_the_run_before_any_stage(tmp_path):
    path = _pipeline(tmp_path, "tasks:\n  - task: reverse\n    params: {min_len: 5, max_len: 2}\n")
    with pytest.raises(ConfigError, match=r"tasks.0.params.max_len: min_len 5 > max_len 2"):
        run_pipeline(load_pipeline(path))
    assert not (tmp_path / "run" / "synth").exists()


def test_recipe_params_are_honoured(tmp_path):
    run_pipeline(load_pipeline(_pipeline(tmp_path, "tasks:\n  - task: add\n    params: {max_value: 3}\n")))
    rows = read_rows(str(tmp_path / "run" / "synth" / "train.jsonl"))
    assert rows and all(int(r["answer"]) <= 6 for r in rows)


# ----------------------------------------------------------------------------------------------
# a teacher's empty answers on the recipe path


def _sorted_list(prompt: str) -> str:
    """The right answer to a sort prompt ("Sort these numbers: 3, 1, 2")."""
    return ", ".join(sorted(prompt.split(": ", 1)[1].split(", "), key=int))


class EveryOtherEmpty:
    """A sort teacher that answers every other prompt right and leaves the rest empty (a tiny model with a
    small max_new_tokens does)."""

    def __init__(self, empty_every: int = 2):
        self.empty_every = empty_every

    def generate(self, prompts, sampling):
        texts = ["" if i % self.empty_every == 0 else _sorted_list(p[-1]["content"]) for i, p in enumerate(prompts)]
        return [[Sample(text=t, token_ids=[], finished=True)] for t in texts]

    def close(self) -> None:
        """Nothing to free."""


def _teacher_synth(tmp_path, teacher_dir, monkeypatch, engine) -> Synth:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("tasks:\n  - task: sort\n")
    monkeypatch.setattr(synth_module, "make_engine", lambda *args, **kwargs: engine)
    cfg = SynthConfig.model_validate(
        {"recipe": str(recipe), "teacher": str(teacher_dir), "num_train": 10, "num_eval": 2}
    )
    ctx = StageContext(name="synth", dir=tmp_path / "synth", inputs={}, seed=0)
    ctx.dir.mkdir()
    return Synth(cfg, ctx)


def test_recipe_teacher_empty_answers_are_dropped_and_counted(tmp_path, tiny_model_dir, monkeypatch):
    metrics = _teacher_synth(tmp_path, tiny_model_dir, monkeypatch, EveryOtherEmpty()).run()
    assert metrics["teacher"]["empty_answers_dropped"] == 5  # the prompts path's name for the count
    assert metrics["num_train"] == 5 and metrics["num_eval"] == 2
    assert metrics["teacher"]["agrees_with_oracle"] == 0.5 and metrics["teacher"]["unfinished"] == 0
    rows = read_rows(str(tmp_path / "synth" / "train.jsonl"))  # what the next stage reads: no empty turn
    assert len(rows) == 5 and all(r["messages"][-1]["content"] == r["answer"] for r in rows)
    assert all(r["source"] == "teacher" and r["finished"] for r in rows)


def test_recipe_teacher_with_only_empty_answers_is_an_error(tmp_path, tiny_model_dir, monkeypatch):
    stage = _teacher_synth(tmp_path, tiny_model_dir, monkeypatch, EveryOtherEmpty(empty_every=1))
    with pytest.raises(RuntimeError, match=r"gave empty answers to 10 of 10 prompts, leaving 0 train and 2 held-out"):
        stage.run()
    assert not (tmp_path / "synth" / "train.jsonl").exists()
