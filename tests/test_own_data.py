"""Your own data through the stages: synth from a prompt set answered by a teacher (dedup, split, the finished
flag, resumable shards), judges that need no task/answer metadata in prefs, ppo and eval, the clear error of a
judge whose columns the rows lack, and (slow) the whole own-data pipeline from scripts/make_own_data.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.config import ConfigError
from posttrain.data import read_rows, write_jsonl
from posttrain.data.prompts import row_prompt_key
from posttrain.engines import Sample, SamplingConfig, make_engine
from posttrain.manifest import read_manifest
from posttrain.pipeline import load_pipeline, run_pipeline
from posttrain.scoring import MissingColumnError, RuleSpec, Scorer, ScoringConfig, required_columns
from posttrain.stages import StageContext
from posttrain.stages.prefs import Prefs, PrefsConfig, build_pairs

from .conftest import REPO, make_rows, write_pipeline

torch.set_num_threads(1)

STYLE = str(REPO / "reward" / "style.py")
VERIFIERS = str(REPO / "reward" / "verifiers.py")
STYLE_RULES = [{"path": STYLE, "function": "well_formed"}, {"path": STYLE, "function": "on_topic"}]


def _script():
    spec = importlib.util.spec_from_file_location("make_own_data", REPO / "scripts" / "make_own_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The script's prompt and preference files, and its teacher trained briefly (6 epochs: answers are
    well-formed sentences, which is all these tests need)."""
    script, out = _script(), tmp_path_factory.mktemp("own_inputs")
    prompts = script.write_prompts(out)
    prefs = script.write_preferences(out, train=40, test=10)
    teacher = script.train_teacher(out, epochs=6)
    return {"prompts": prompts, "preferences": prefs, "teacher": teacher, "dir": out}


def _synth_body(inputs, run_dir: Path, **synth) -> str:
    synth = {
        "prompts": str(inputs["prompts"]),
        "teacher": str(inputs["teacher"]),
        "num_eval": 20,
        "shard_size": 32,
        "teacher_sampling": {"max_new_tokens": 24},
        **synth,
    }
    synth = {k: v for k, v in synth.items() if v is not None}  # None: leave the key out (its default)
    return yaml.safe_dump({"run_dir": str(run_dir), "threads": 1, "stages": ["synth"], "synth": synth})


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# synth from a prompt set


def test_synth_from_prompts_dedups_splits_and_keeps_the_teachers_answers(tmp_path, inputs):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(_synth_body(inputs, tmp_path / "run"))
    run_pipeline(load_pipeline(cfg))
    out = tmp_path / "run" / "synth"
    train, evals = _lines(out / "train.jsonl"), _lines(out / "eval.jsonl")
    card = json.loads((out / "card.json").read_text())
    source = read_rows(str(inputs["prompts"]), "prompt")
    distinct = {row_prompt_key(r) for r in source}
    assert len(source) == 200 and len(distinct) == 185  # the script planted 15 retyped repeats
    assert card["prompt_counts"] == {"read": 200, "skipped_unreadable": 0, "duplicates_dropped": 15, "distinct": 185}
    train_keys, eval_keys = [row_prompt_key(r) for r in train], [row_prompt_key(r) for r in evals]
    assert len(set(train_keys)) == len(train_keys) and len(set(eval_keys)) == len(eval_keys)  # deduplicated
    assert not set(train_keys) & set(eval_keys)  # no prompt on both sides
    empty = card["teacher"]["empty_answers_dropped"]
    assert 20 - empty <= len(evals) <= 20  # num_eval held out, less any the teacher left empty
    assert len(train) + len(evals) + empty == 185 and set(train_keys) | set(eval_keys) <= distinct
    assert card["train"]["rows"] == len(train) and card["eval"]["rows"] == len(evals)
    assert "per_task" not in card["train"]  # no task column anywhere
    for row in train + evals:  # metadata rides along; the teacher's finished flag is kept; nothing invented
        assert set(row) == {"messages", "id", "category", "finished"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and row["messages"][1]["content"].strip()
    assert card["teacher"]["unfinished"] == sum(not r["finished"] for r in train + evals)
    # the answers and flags are the teacher's own: generate some again, greedily, and compare
    engine = make_engine(str(inputs["teacher"]), SamplingConfig(max_new_tokens=24), torch.device("cpu"))
    some = train[:6] + evals[:2]
    again = engine.generate([r["messages"][:1] for r in some], SamplingConfig(max_new_tokens=24))
    assert [(r["messages"][1]["content"], r["finished"]) for r in some] == [(s[0].text, s[0].finished) for s in again]
    assert any(r["finished"] for r in some)
    metrics = read_manifest(out)["metrics"]
    assert metrics["teacher"]["prompts_generated"] == 185 and metrics["teacher"]["shards"] == 6
    assert metrics["num_train"] == len(train) and metrics["prompts"]["duplicates_dropped"] == 15


def test_synth_from_prompts_split_by_fraction_and_config_errors(tmp_path, inputs):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        _synth_body(inputs, tmp_path / "run", num_eval=None, eval_fraction=0.2, teacher_sampling={"max_new_tokens": 4})
    )
    run_pipeline(load_pipeline(cfg))
    card = json.loads((tmp_path / "run" / "synth" / "card.json").read_text())
    assert card["eval"]["rows"] + card["teacher"]["empty_answers_dropped"] >= 37  # round(185 * 0.2)
    assert card["train"]["rows"] <= 148

    def error(**synth) -> str:
        body = yaml.safe_load(_synth_body(inputs, tmp_path / "err"))
        body["synth"] = {k: v for k, v in {**body["synth"], **synth}.items() if v is not None}
        path = tmp_path / "err.yaml"
        path.write_text(yaml.safe_dump(body))
        with pytest.raises(ConfigError) as err:
            run_pipeline(load_pipeline(path))
        return str(err.value)

    assert "recipe and prompts are alternatives" in error(recipe=str(REPO / "data/recipes/quickstart.yaml"))
    assert "synth.prompts needs synth.teacher" in error(teacher=None)
    assert "set synth.recipe" in error(prompts=None, teacher=None) and "synth.prompts" in error(prompts=None)
    assert "num_train applies to recipes" in error(num_train=10)
    full = load_pipeline(cfg).synth  # a rank re-validates the whole dumped section: no field counts as "set"
    assert type(full).model_validate(full.model_dump(mode="json")) == full


def test_synth_held_out_count_larger_than_the_prompts_is_refused(tmp_path, inputs):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(_synth_body(inputs, tmp_path / "run", num_eval=185))
    with pytest.raises(
        ConfigError, match=r"synth.num_eval 185 holds out 185 of 185 distinct prompts.*200 prompts read, 15 dup"
    ):
        run_pipeline(load_pipeline(cfg))


KILLER = """
import os, signal, sys
import posttrain.stages.synth_prompts as sp
write, written = sp.write_shard, [0]
def write_then_die(*args, **kwargs):  # SIGKILL right after shard N is renamed into place
    write(*args, **kwargs)
    written[0] += 1
    if written[0] == int(os.environ["DIE_AFTER_SHARDS"]):
        os.kill(os.getpid(), signal.SIGKILL)
sp.write_shard = write_then_die
from posttrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_synth_killed_at_60_percent_resumes_from_its_shards(tmp_path, inputs):
    # sampled answers (temperature 0.8): a resumed shard equals the uninterrupted one only if each shard is
    # seeded by its own position, whatever ran before it in the process
    body = _synth_body(
        inputs, tmp_path / "run", shard_size=16, teacher_sampling={"temperature": 0.8, "max_new_tokens": 16, "seed": 5}
    )
    cfg = tmp_path / "p.yaml"
    cfg.write_text(body)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIE_AFTER_SHARDS": "7", "OMP_NUM_THREADS": "1"}
    shards = tmp_path / "run" / "synth" / "shards"
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, "synth", str(cfg)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in shards.iterdir()) == [f"shard-{k:05d}.jsonl" for k in range(7)]  # of 12
    assert read_manifest(tmp_path / "run" / "synth")["status"] == "running"
    assert not (tmp_path / "run" / "synth" / "train.jsonl").exists()
    before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    time.sleep(0.05)

    resumed = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "synth", str(cfg)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: 7 of 12 shards already answered (112 prompts); answering the other 73 prompts" in resumed.stderr
    assert resumed.stderr.count("written (16 prompts)") + resumed.stderr.count("written (9 prompts)") == 5
    teacher = read_manifest(tmp_path / "run" / "synth")["metrics"]["teacher"]
    assert (teacher["prompts_generated"], teacher["prompts_reused"], teacher["shards_reused"]) == (73, 112, 7)
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if p.name in before} == before  # not redone

    whole = tmp_path / "whole.yaml"
    whole.write_text(body.replace(str(tmp_path / "run"), str(tmp_path / "whole")))
    run_pipeline(load_pipeline(whole))
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "run" / "synth" / name).read_bytes() == (tmp_path / "whole" / "synth" / name).read_bytes()
    cards = [json.loads((tmp_path / d / "synth" / "card.json").read_text()) for d in ("run", "whole")]
    for card in cards:
        for key in ("prompts_generated", "prompts_reused", "shards_reused"):
            card["teacher"].pop(key)
    assert cards[0] == cards[1]


@pytest.mark.slow
def test_synth_from_prompts_under_two_ranks_shares_the_prompts(tmp_path, inputs):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(_synth_body(inputs, tmp_path / "one"))
    two.write_text(_synth_body(inputs, tmp_path / "two", distributed={"num_processes": 2}))
    run_pipeline(load_pipeline(one))
    run_pipeline(load_pipeline(two))
    teacher = read_manifest(tmp_path / "two" / "synth")["metrics"]["teacher"]
    assert teacher["prompts_generated"] == 185 and teacher["shards"] == 6
    for name in ("train.jsonl", "eval.jsonl"):  # greedy answers: the same whoever generated them
        assert _lines(tmp_path / "one" / "synth" / name) == _lines(tmp_path / "two" / "synth" / name)


# ----------------------------------------------------------------------------------------------
# Judges that need no metadata, and the error of one that does


def _prompt_rows(inputs, n: int) -> list[dict]:
    return read_rows(str(inputs["prompts"]), "prompt")[:n]


def test_scorer_names_the_rule_and_the_column_the_rows_lack():
    assert required_columns(lambda prompts, completions, answer, task=None, **_: []) == ["answer"]
    assert required_columns(lambda prompts, completions, *, gold, **kw: []) == ["gold"]
    rows = [{"messages": [{"role": "user", "content": "hi"}], "id": "a"}, {"messages": [], "id": "b", "task": "x"}]
    scorer = Scorer(
        ScoringConfig(
            rules=[
                RuleSpec(path=VERIFIERS, function="task_correct"),
                RuleSpec(path=VERIFIERS, function="refusal"),
                RuleSpec(path=STYLE, function="well_formed"),
            ]
        )
    )
    with pytest.raises(MissingColumnError) as err:
        scorer.check_rows(rows, "my.jsonl", "ppo.scoring")
    message = str(err.value)
    assert (
        f"rule reward {VERIFIERS}:task_correct needs the column 'answer', which 2 of 2 rows of my.jsonl lack"
    ) in message
    assert f"{VERIFIERS}:refusal needs the column 'task', which 1 of 2 rows" in message
    assert "well_formed" not in message.split("(columns")[0]  # a rule that needs nothing is not blamed
    assert "columns every row has: id)" in message and "ppo.scoring.reward_model" in message
    assert "ppo.scoring.rules" in message
    with pytest.raises(MissingColumnError, match="task_correct needs the column 'answer'"):  # also when scoring
        scorer.score([[{"role": "user", "content": "hi"}]], ["Hello there friend."], [{"task": "x"}])
    style = Scorer(ScoringConfig(rules=[RuleSpec(path=STYLE, function=f["function"]) for f in STYLE_RULES]))
    style.check_rows(rows)
    scores = style.score([[{"role": "user", "content": "Describe a cat."}]] * 2, ["A cat is small.", "dog dog"])
    assert scores.parts["well_formed"].tolist() == [1.0, 0.0] and scores.parts["on_topic"].tolist() == [1.0, 0.0]


class FakeEngine:
    """Scripted answers: prompt text -> completions."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers

    def generate(self, prompts, sampling):
        return [[Sample(text=t, token_ids=[], finished=True) for t in self.answers[p[-1]["content"]]] for p in prompts]

    def close(self) -> None:
        """Nothing to free."""


def _prefs_stage(tmp_path, inputs, **cfg) -> Prefs:
    train, evals = _prompt_rows(inputs, 12)[:8], _prompt_rows(inputs, 12)[8:]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", evals)
    ctx = StageContext(
        name="prefs",
        dir=tmp_path / "prefs",
        seed=0,
        inputs={
            "model": str(inputs["teacher"]),
            "train_data": str(tmp_path / "train.jsonl"),
            "eval_data": str(tmp_path / "eval.jsonl"),
        },
    )
    ctx.dir.mkdir()
    return Prefs(PrefsConfig.model_validate({"sampling": {"n": 3, "temperature": 1.0}, **cfg}), ctx)


def test_prefs_best_of_n_on_prompt_only_rows_judged_by_metadata_free_rules(tmp_path, inputs):
    stage = _prefs_stage(tmp_path, inputs, scoring={"rules": STYLE_RULES})
    stage.setup()
    assert all(r["messages"][-1]["role"] == "user" and "answer" not in r for r in stage.train_rows)
    answers = {}
    for row in stage.train_rows + stage.eval_rows:
        subject = max(row["messages"][-1]["content"].replace("?", " ").replace(".", " ").split(), key=len)
        answers[row["messages"][-1]["content"]] = ["no idea", f"It is about the {subject}.", "Maybe maybe so."]
    stage.make_engine = lambda: FakeEngine(answers)
    stage.train()
    stage.save()
    pairs = _lines(stage.ctx.dir / "train.jsonl")
    report = json.loads((stage.ctx.dir / "report.json").read_text())
    assert len(pairs) == 8 and {p["source"] for p in pairs} == {"best_of_n"}
    for p in pairs:  # the rules' favourite (well-formed and on topic) over their least favourite
        assert p["chosen"][-1]["content"].startswith("It is about the") and p["rejected"][-1]["content"] == "no idea"
        assert p["margin"] == 1.75 and p["chosen"][:-1] == p["rejected"][:-1] and {"id", "category"} <= set(p)
    # teacher and corruption need a reference answer: prompts only are skipped and counted
    assert report["train"]["per_source"]["teacher"]["dropped"] == {"no_reference": 8}
    assert report["train"]["per_source"]["corruption"]["dropped"] == {"no_reference": 8}
    assert report["eval"]["pairs"] == 4


def test_prefs_best_of_n_on_prompt_only_rows_judged_by_a_reward_model(tmp_path, inputs):
    """An implicit-head reward model (the teacher, scored by its answer likelihood) and no rules."""
    from posttrain.implicit_rm import write_reward_head
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(inputs["teacher"], rm)
    write_reward_head(rm, 2.0)
    stage = _prefs_stage(
        tmp_path,
        inputs,
        scoring={"rules": [], "reward_model": str(rm)},
        max_train_prompts=4,
        teacher={"enabled": False},
        corruption={"enabled": False},
    )
    stage.setup()
    rows = stage.train_rows
    engine = make_engine(str(inputs["teacher"]), SamplingConfig(), torch.device("cpu"))
    samples = engine.generate([r["messages"] for r in rows], SamplingConfig(max_new_tokens=24))
    teacher_says = [s[0].text for s in samples]
    answers = {r["messages"][-1]["content"]: ["Bananas fly purple tonight.", t] for r, t in zip(rows, teacher_says)}
    pairs, report = build_pairs(rows, FakeEngine(answers), stage.scorer, stage.cfg, seed=0)
    assert len(pairs) == 4 and report["per_source"]["best_of_n"]["pairs"] == 4
    assert [p["chosen"][-1]["content"] for p in pairs] == teacher_says  # its own answers are the likeliest


def test_default_verifiers_on_rows_without_task_or_answer_fail_before_sampling(tmp_path, inputs):
    stage = _prefs_stage(tmp_path, inputs)  # default judges: reward/verifiers.py task_correct, refusal, identity
    stage.make_engine = lambda: pytest.fail("no sampling may start")
    with pytest.raises(MissingColumnError) as err:
        stage.setup()
    message = str(err.value)
    assert "verifiers.py:task_correct needs the column 'answer'" in message
    assert "verifiers.py:refusal needs the column 'task'" in message and "verifiers.py:identity needs" in message
    assert "rows of prefs.train_data lack" in message and "columns every row has: category, id" in message
    assert "prefs.scoring.reward_model" in message and "prefs.scoring.rules" in message
    (tmp_path / "b").mkdir()
    only_references = _prefs_stage(tmp_path / "b", inputs, scoring={"rules": STYLE_RULES}, best_of_n={"enabled": False})
    with pytest.raises(ConfigError, match="prefs.teacher and prefs.corruption need each row's reference answer"):
        only_references.setup()


def test_ppo_checks_its_judges_against_prompt_only_rows_up_front(tmp_path, inputs):
    write_jsonl(tmp_path / "prompts.jsonl", _prompt_rows(inputs, 8))
    body = yaml.safe_dump(
        {
            "stages": ["ppo"],
            "ppo": {
                "model": str(inputs["teacher"]),
                "train_data": str(tmp_path / "prompts.jsonl"),
                "advantage": "grpo",
                "kl_mode": "off",
                "updates": 1,
                "rollout_batch_size": 4,
                "mini_batch_size": 8,
                "ppo_epochs": 1,
                "sampling": {"backend": "hf", "n": 2, "temperature": 1.0, "max_new_tokens": 8},
                "scoring": {"use_reward_model": False, "rules": [{"path": VERIFIERS, "function": "task_correct"}]},
            },
        }
    )
    with pytest.raises(
        MissingColumnError,
        match=r"task_correct needs the column 'answer', which 8 of 8 rows of ppo.train_data lack.*ppo.scoring.rules",
    ):
        run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))
    assert not (tmp_path / "run" / "ppo" / "metrics.jsonl").exists()  # failed in setup, before any rollout
    run_pipeline(load_pipeline(write_pipeline(tmp_path, body), [f"ppo.scoring.rules={json.dumps(STYLE_RULES)}"]))
    history = _lines(tmp_path / "run" / "ppo" / "metrics.jsonl")
    assert len(history) == 1 and "well_formed" in json.dumps(history[0])


def _eval_body(tmp_path, rows: list[dict], models: dict, **eval_cfg) -> str:
    write_jsonl(tmp_path / "held_out.jsonl", rows)
    return yaml.safe_dump(
        {
            "stages": ["eval"],
            "eval": {
                "eval_data": str(tmp_path / "held_out.jsonl"),
                "models": models,
                "baseline": "untrained",
                "num_prompts": None,
                "bootstrap_samples": 200,
                "sampling": {"max_new_tokens": 24},
                **eval_cfg,
            },
        }
    )


def test_eval_win_rate_on_prompt_only_rows(tmp_path, inputs, tiny_model_dir):
    rows = _prompt_rows(inputs, 10)
    models = {"untrained": str(tiny_model_dir), "teacher": str(inputs["teacher"])}
    cfg = load_pipeline(write_pipeline(tmp_path, _eval_body(tmp_path, rows, models, scoring={"rules": STYLE_RULES})))
    run_pipeline(cfg)
    out = tmp_path / "run" / "eval"
    results = json.loads((out / "results.json").read_text())
    assert results["judges"] == ["rules"] and results["tasks"] == []
    win = results["models"]["teacher"]["win_rate"]["rules"]
    assert win["n"] == 10 and win["win_rate"] > 0.9  # well-formed sentences beat an untrained model's noise
    teacher = results["models"]["teacher"]
    assert teacher["accuracy"] is None and teacher["refusal_rate"] is None and teacher["identity"] is None
    assert set(results["skipped"]) == {"accuracy", "refusal", "identity", "memorisation"}  # no train_data
    assert "10 of 10 rows have no 'answer' column" in results["skipped"]["accuracy"]
    assert "Left out" in (out / "results.md").read_text() and not (out / "accuracy.png").exists()
    completions = _lines(out / "completions.jsonl")
    style = Scorer(ScoringConfig(rules=[RuleSpec(**r) for r in STYLE_RULES]))
    judged = style.score([c["prompt"] for c in completions], [c["completions"]["teacher"] for c in completions])
    assert teacher["judge_means"]["rules"] == round(judged.total.mean().item(), 4)

    # default judges: the verifiers judge only the rows with task and answer; with none and no reward model the
    # error says what to configure
    with pytest.raises(
        ConfigError, match=r"no judge for these prompts.*need answer and task columns.*eval.scoring.reward_model"
    ):
        run_pipeline(load_pipeline(write_pipeline(tmp_path, _eval_body(tmp_path, rows, models))))
    mixed = make_rows(4, seed=2) + rows
    run_pipeline(load_pipeline(write_pipeline(tmp_path, _eval_body(tmp_path, mixed, models))))
    results = json.loads((out / "results.json").read_text())
    assert results["judges"] == ["verifiers"] and results["models"]["teacher"]["win_rate"]["verifiers"]["n"] == 4
    assert results["models"]["teacher"]["accuracy"]["n"] == 4 and "10 of 14 rows" in results["skipped"]["verifiers"]
    assert (
        "4 of 14 rows" not in results["skipped"]["accuracy"]
        and "over the other 4 rows" in results["skipped"]["accuracy"]
    )


# ----------------------------------------------------------------------------------------------
# The whole own-data pipeline


@pytest.mark.slow
def test_own_data_pipeline_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    made = subprocess.run(
        [sys.executable, "scripts/make_own_data.py", str(tmp_path / "inputs")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    inp = tmp_path / "inputs"
    assert (inp / "prompts.parquet").is_file() and (inp / "teacher" / "config.json").is_file()
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"synth.prompts={inp / 'prompts.parquet'}",
        f"synth.teacher={inp / 'teacher'}",
        f"rm.prefs_train.path={inp / 'preferences'}",
        f"rm.prefs_eval.path={inp / 'preferences'}",
    ]
    started = time.time()
    ran = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "run", "configs/own-data-cpu.yaml", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    print(f"own-data pipeline: {time.time() - started:.0f} s")
    run = tmp_path / "run"
    stages = yaml.safe_load((REPO / "configs" / "own-data-cpu.yaml").read_text())["stages"]
    assert all(read_manifest(run / s)["status"] == "complete" for s in stages)
    synth = read_manifest(run / "synth")["metrics"]
    assert synth["prompts"]["duplicates_dropped"] == 15 and synth["num_train"] > 100
    rm = read_manifest(run / "rm")["metrics"]
    assert rm["train_pairs"] == 400 and rm["heldout"]["accuracy"] > 0.8  # UltraFeedback-layout pairs learnt
    assert rm["heldout_accuracy_per_source"] == {}  # the pairs name no source: no breakdown by ""
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["judges"] == ["rules", "reward_model"] and set(results["models"]["ppo"]["win_rate"]) == {
        "rules",
        "reward_model",
    }
    from posttrain.models import load_model, load_tokenizer
    from posttrain.engines import HFEngine

    release = run / "release" / "release"
    engine = HFEngine(load_model(release, device="cpu"), load_tokenizer(release))
    text = engine.generate(
        [[{"role": "user", "content": "Describe a cat in one sentence."}]], SamplingConfig(max_new_tokens=24)
    )[0][0].text
    assert text.strip()
    card = (release / "README.md").read_text()  # about this data, not the quickstart's templated tasks
    first_prompt = json.loads((run / "synth" / "eval.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
    assert "templated" not in card and "Sort these numbers" not in card
    assert json.dumps(first_prompt, ensure_ascii=False) in card
    print("eval:", json.dumps({m: v.get("win_rate") for m, v in results["models"].items()}))
