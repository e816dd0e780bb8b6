"""The pipeline spine: manifests, skipping finished stages, re-running changed ones, failures."""

import json

import pytest

from posttrain.cli import main as cli_main
from posttrain.config import ConfigError
from posttrain.manifest import atomic_dir, read_manifest
from posttrain.pipeline import MissingInput, load_pipeline, run_pipeline

from .conftest import QUICKSTART_RECIPE, TINY, write_pipeline

BODY = (
    f"stages: [synth, base]\nsynth: {{recipe: {QUICKSTART_RECIPE}, num_train: 200, num_eval: 20}}\n"
    "base: " + json.dumps({**TINY, "family": "llama"}) + "\n"
)


def _run(path, overrides=(), **kw):
    return run_pipeline(load_pipeline(path, list(overrides)), **kw)


def test_run_writes_manifests_and_skips_when_unchanged(tmp_path):
    path = write_pipeline(tmp_path, BODY)
    first = _run(path)
    assert [s["status"] for s in first.values()] == ["ran", "ran"]
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    m = read_manifest(run / "base")
    assert m["status"] == "complete" and m["artifacts"]["model"] == str(run / "base" / "model")
    assert m["inputs"]["train_data"] == str(run / "synth" / "train.jsonl")
    assert (run / "base" / "model" / "model.safetensors").is_file()
    stamp = m["updated"], (run / "synth" / "train.jsonl").stat().st_mtime_ns

    second = _run(path)
    assert [s["status"] for s in second.values()] == ["skipped", "skipped"]
    assert (read_manifest(run / "base")["updated"], (run / "synth" / "train.jsonl").stat().st_mtime_ns) == stamp


def test_changed_stage_reruns_with_everything_after_it(tmp_path):
    path = write_pipeline(tmp_path, BODY)
    _run(path)
    s = _run(path, ["base.hidden_size=32"])
    assert (s["synth"]["status"], s["base"]["status"]) == ("skipped", "ran")
    s = _run(path, ["base.hidden_size=32", "synth.num_train=150"])
    assert (s["synth"]["status"], s["base"]["status"]) == ("ran", "ran")
    assert s["synth"]["num_train"] + s["synth"]["num_eval"] == 170


def test_interrupted_stage_is_not_complete_and_reruns(tmp_path):
    path = write_pipeline(tmp_path, BODY)
    _run(path)
    manifest = tmp_path / "run" / "base" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "status": "running"}))  # as if killed mid-stage
    s = _run(path)
    assert (s["synth"]["status"], s["base"]["status"]) == ("skipped", "ran")


def test_failed_stage_records_error_and_keeps_earlier_results(tmp_path):
    recipe = tmp_path / "bad_recipe.yaml"
    recipe.write_text("tasks:\n  - task: count\n")  # 72 distinct prompts: fewer than the 220 asked, known only at run
    path = write_pipeline(tmp_path, BODY.replace(QUICKSTART_RECIPE, str(recipe)))
    with pytest.raises(Exception, match="yields only"):
        _run(path)
    m = read_manifest(tmp_path / "run" / "synth")
    assert m["status"] == "failed" and "yields only" in m["error"]
    assert read_manifest(tmp_path / "run" / "base") is None


def test_single_stage_uses_earlier_artifacts_or_names_missing_input(tmp_path):
    path = write_pipeline(
        tmp_path, f"stages: [synth, base, sft]\nsynth: {{recipe: {QUICKSTART_RECIPE}, num_train: 50, num_eval: 10}}\n"
    )
    with pytest.raises(MissingInput, match=r"stage 'sft' needs input 'model': set sft.model"):
        _run(path, only="sft")
    s = _run(path, only="synth")
    assert list(s) == ["synth"] and s["synth"]["status"] == "ran"
    # The finished synth is base's input, not a stage of this run: the summary lists base alone.
    s = _run(path, only="base")
    assert list(s) == ["base"] and s["base"]["status"] == "ran"


def test_a_base_built_from_config_without_data_is_refused_before_any_work(tmp_path):
    """base trains its tokenizer on its train_data or the data before it: with neither and no `base.path`, the
    whole-pipeline check says so, instead of the stage failing once the run reaches it."""
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    body = f"stages: [base, sft]\nbase: {json.dumps(TINY)}\nsft: {{train_data: {tmp_path / 'train.jsonl'}}}\n"
    expected = r"'base' needs input 'train_data': set base.train_data .* run a stage .* set base.path"
    with pytest.raises(MissingInput, match=expected):
        _run(write_pipeline(tmp_path, body))
    assert not (tmp_path / "run" / "base").exists()


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    path = write_pipeline(tmp_path, "stages: [synth]\nsynth: {num_train: zero}\n")
    assert cli_main(["run", path]) == 2
    assert "synth.num_train" in capsys.readouterr().err


def test_command_line_takes_overrides_after_flags_and_refuses_only_with_from(capsys):
    from posttrain.cli import _parse

    args = _parse(["run", "c.yaml", "a.x=1", "--only", "eval", "eval.num_prompts=5", "--force"])
    assert args.overrides == ["a.x=1", "eval.num_prompts=5"] and args.only == "eval" and args.force
    for argv in (["run", "c.yaml", "--only", "a", "--from", "b"], ["run", "c.yaml", "--bogus"], ["run"]):
        with pytest.raises(SystemExit):
            _parse(argv)
    err = capsys.readouterr().err
    assert "--only and --from exclude each other" in err and "unrecognized arguments: --bogus" in err
    assert "required: config\n" in err  # the overrides are optional


def test_show_runs_the_pre_run_check(tmp_path, capsys):
    """`show` validates what `run` would refuse before any work, e.g. a misspelt reference."""
    body = f"stages: [synth, base, merge]\nsynth: {{recipe: {QUICKSTART_RECIPE}}}\n"
    path = write_pipeline(tmp_path, body + "merge: {method: task_arithmetic, base: base.model}\n")
    assert cli_main(["show", path]) == 0
    assert cli_main(["show", path, "merge.models=[base.modle]"]) == 2
    assert "merge.models.0='base.modle': no earlier stage produces this artifact" in capsys.readouterr().err
    assert cli_main(["show", path, "device=cpu", "precision=fp16"]) == 2  # the run-level checks too
    assert "precision: fp16 mixed precision needs a CUDA device" in capsys.readouterr().err


def test_only_names_the_unfinished_stage_a_reference_waits_for(tmp_path):
    body = f"stages: [synth, base, merge]\nsynth: {{recipe: {QUICKSTART_RECIPE}}}\n"
    path = write_pipeline(tmp_path, body + "merge: {method: task_arithmetic, base: base.model}\n")
    with pytest.raises(ConfigError, match=r"merge.base='base.model': stage 'base' has not finished in this run"):
        _run(path, only="merge")


def test_only_runs_the_pre_run_check_of_its_stage(tmp_path, tiny_model_dir):
    """`posttrain eval CONFIG` checks what `run` checks before it clears the stage's finished output."""
    (tmp_path / "r.py").write_text("def ok(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    rules = f"rules: [{{path: {tmp_path / 'r.py'}, function: nope}}]"
    body = f"stages: [synth, eval]\nsynth: {{recipe: {QUICKSTART_RECIPE}}}\n"
    path = write_pipeline(tmp_path, body + f"eval: {{models: {{m: {tiny_model_dir}}}, scoring: {{{rules}}}}}\n")
    with pytest.raises(ConfigError, match=r"eval.scoring.rules.0: .*r.py defines no function 'nope'"):
        _run(path, only="eval")


def test_an_eval_verifiers_file_without_the_slices_functions_is_refused_before_any_stage(tmp_path, tiny_model_dir):
    verifiers = tmp_path / "v.py"
    verifiers.write_text("def task_correct(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    body = f"stages: [synth, eval]\nsynth: {{recipe: {QUICKSTART_RECIPE}}}\n"
    path = write_pipeline(tmp_path, body + f"eval: {{models: {{m: {tiny_model_dir}}}, verifiers: {verifiers}}}\n")
    with pytest.raises(ConfigError, match=r"eval.verifiers: .*v.py defines no function 'refusal'"):
        _run(path)
    assert not (tmp_path / "run" / "synth").exists()  # nothing ran


def test_a_base_model_in_another_chat_format_is_refused_before_any_stage(tmp_path, tiny_model_dir):
    """posttrain trains and releases in the Gemma turn format: a ChatML model used to train, then fail at release."""
    import shutil

    chatml = tmp_path / "chatml"
    shutil.copytree(tiny_model_dir, chatml)
    config = json.loads((chatml / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (chatml / "tokenizer_config.json").write_text(json.dumps(config))
    (chatml / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = write_pipeline(tmp_path, f"stages: [base, sft]\nbase: {{path: {chatml}}}\n")
    with pytest.raises(ConfigError, match=r"base.path: .*chatml: the tokenizer's chat template does not render"):
        _run(path)
    assert not (tmp_path / "run" / "base").exists()
    assert cli_main(["show", path]) == 2


def test_a_copied_run_directory_skips_its_finished_stages(tmp_path):
    """Fingerprints hash a reference as written (`base.model`), not the run directory's path it resolves to."""
    import shutil

    body = f"stages: [synth, base, merge]\nsynth: {{recipe: {QUICKSTART_RECIPE}, num_train: 30, num_eval: 5}}\n"
    path = write_pipeline(tmp_path, body + "merge: {method: task_arithmetic, base: base.model}\n")
    assert {s["status"] for s in _run(path).values()} == {"ran"}
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    summary = _run(path, [f"run_dir={tmp_path / 'copy'}"])
    assert {name: s["status"] for name, s in summary.items()} == dict.fromkeys(["synth", "base", "merge"], "skipped")


def test_resuming_removes_the_temp_paths_a_killed_run_left(tmp_path):
    """SIGKILL skips atomic_dir's clean-up: the resumed stage removes its leftovers (a 97 MB partial merge
    in a trial), and nothing else."""
    path = write_pipeline(
        tmp_path, f"stages: [synth]\nsynth: {{recipe: {QUICKSTART_RECIPE}, num_train: 20, num_eval: 5}}\n"
    )
    _run(path)
    sdir = tmp_path / "run" / "synth"
    manifest = json.loads((sdir / "manifest.json").read_text())
    (sdir / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    stale = [sdir / ".model.k3j.tmp", sdir / ".model.old", sdir / ".model.adapters.x1", sdir / "sub" / ".a.json.q.tmp"]
    for p in stale[:3]:
        p.mkdir()
    stale[3].parent.mkdir()
    stale[3].write_text("{")
    (sdir / "keep.tmp").write_text("mine")
    assert _run(path)["synth"]["status"] == "ran"
    assert not [p for p in stale if p.exists()] and (sdir / "keep.tmp").read_text() == "mine"


def test_run_force_reruns_a_complete_stage(tmp_path):
    path = write_pipeline(
        tmp_path, f"stages: [synth]\nsynth: {{recipe: {QUICKSTART_RECIPE}, num_train: 20, num_eval: 5}}\n"
    )
    assert _run(path)["synth"]["status"] == "ran"
    assert _run(path)["synth"]["status"] == "skipped"
    assert _run(path, force=True)["synth"]["status"] == "ran"


def test_run_summary_prints_whole_metrics_of_any_kind(tmp_path, capsys):
    """The end-of-run lines show what a stage measured when it has no task accuracy (`overall`), e.g. the
    sampled reward on a user's data, and never cut a metric line in the middle."""
    from posttrain.cli import print_summary

    models = {f"metric_{i}": 0.123456 for i in range(12)} | {"memorised": 0.0}
    print_summary(
        tmp_path,
        {
            "ppo": {"status": "ran", "seconds": 2.0, "accuracy_before": {"sampled_reward": -2.19, "n": 60}},
            "eval": {"status": "ran", "seconds": 1.0, "models": {"ppo": models}},
        },
    )
    out = capsys.readouterr().out
    assert "accuracy_before: sampled_reward=-2.19, n=60" in out
    assert "metric_11=0.1235, memorised=0\n" in out


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (final / "done.txt").read_text() == "ok" and len(list(tmp_path.iterdir())) == 1


def test_atomic_outputs_get_the_permissions_open_and_mkdir_give(tmp_path, tiny_tokenizer):
    """Files and directories renamed into place (manifests, JSONL, filter output, a stage's or release's
    directory) are as readable as what open() and mkdir make under the same umask, not mkstemp's 0600 and
    mkdtemp's 0700 (nor safetensors' 0600): a release is for others to load. A saved model has use_cache on."""
    import os

    import torch
    from safetensors.torch import save_file

    from posttrain.data import write_jsonl
    from posttrain.manifest import UMASK, atomic_write_json
    from posttrain.models import finish_model_dir

    assert UMASK & 0o077 != 0o077, "a umask that lets nobody else read shows nothing here"
    old = os.umask(UMASK)  # the umask the module read at import
    try:
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain_dir").mkdir()
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
        with atomic_dir(tmp_path / "release") as tmp:
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors 0.8 writes 0600
            (tmp / "sub").mkdir(mode=0o700)
        (tmp_path / ".partial").mkdir()  # a Trainer's save, completed and renamed by finish_model_dir
        save_file({"w": torch.zeros(2)}, tmp_path / ".partial" / "model.safetensors")
        (tmp_path / ".partial" / "config.json").write_text('{"use_cache": false}')  # as TRL leaves it
        finish_model_dir(tmp_path / ".partial", tmp_path / "model", tiny_tokenizer)
    finally:
        os.umask(old)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("m.json") == mode("rows.jsonl") == mode("release/model.safetensors") == mode("plain.txt")
    assert mode("model/model.safetensors") == mode("model/tokenizer.json") == mode("plain.txt")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["use_cache"] is True
    assert mode("release") == mode("release/sub") == mode("plain_dir")


def test_changing_the_pipeline_precision_reruns_the_stages(tmp_path):
    """`precision` at the top level changes what every stage computes and saves: a finished fp32 stage is not
    reused for a bf16 run (it used to be: only a stage's own section was hashed)."""
    path = write_pipeline(tmp_path, BODY)
    assert _run(path)["base"]["status"] == "ran"
    bf16 = _run(path, ["precision=bf16"])
    assert bf16["synth"]["status"] == bf16["base"]["status"] == "ran"
    assert read_manifest(tmp_path / "run" / "base")["precision"] == "bf16"
    assert _run(path, ["precision=bf16"])["base"]["status"] == "skipped"
    assert _run(path)["base"]["status"] == "ran"  # back to fp32


def test_editing_a_referenced_file_reruns_the_stage(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("tasks:\n  - task: sort\n  - task: count\n")
    path = write_pipeline(tmp_path, BODY.replace(QUICKSTART_RECIPE, str(recipe)))
    _run(path)
    assert _run(path)["synth"]["status"] == "skipped"
    recipe.write_text("tasks:\n  - task: sort\n  - task: add\n")  # same config text, new content
    s = _run(path)
    assert (s["synth"]["status"], s["base"]["status"]) == ("ran", "ran")
    assert set(s["synth"]["tasks"]) == {"sort", "add"}


def test_a_folder_named_like_a_setting_leaves_finished_stages_finished(tmp_path, monkeypatch):
    """Only path-typed fields (and rule and hook files) name files: a folder in the working directory named like
    a setting's value (`family: llama`, `backend: hf`) used to enter the fingerprint and re-run the stage."""

    def strings(tree):
        if isinstance(tree, dict):
            tree = list(tree.values())
        if isinstance(tree, list):
            return {s for item in tree for s in strings(item)}
        return {tree} if isinstance(tree, str) and tree and "/" not in tree else set()

    monkeypatch.chdir(tmp_path)
    path = write_pipeline(tmp_path, BODY)
    assert [s["status"] for s in _run(path).values()] == ["ran", "ran"]
    cfg = load_pipeline(path, [])
    names = strings([getattr(cfg, stage).model_dump(mode="json") for stage in ("synth", "base")])
    assert {"llama", "hf", "float32"} <= names
    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
    assert [s["status"] for s in _run(path).values()] == ["skipped", "skipped"]


def test_synth_simulated_teacher_errs_on_the_asked_share_of_verifiable_answers(tmp_path):
    from posttrain.tasks import normalise_answer

    path = write_pipeline(
        tmp_path,
        f"stages: [synth]\nsynth: {{recipe: {QUICKSTART_RECIPE}, num_train: 600, "
        f"num_eval: 100, teacher_error_rate: 0.3}}\n",
    )
    metrics = _run(path)["synth"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "synth" / "train.jsonl").read_text().splitlines()]
    wrong = [normalise_answer(r["messages"][-1]["content"]) != normalise_answer(r["answer"]) for r in rows]
    verifiable = [r["task"] in ("add", "count", "sort", "reverse", "upper") for r in rows]
    assert sum(wrong) == metrics["teacher_errors"] == sum(r.get("source") == "teacher_error" for r in rows)
    assert 0.25 < sum(wrong) / sum(verifiable) < 0.35
    assert not any(w and not v for w, v in zip(wrong, verifiable))  # refusals and identity stay right
    held_out = [json.loads(line) for line in (tmp_path / "run" / "synth" / "eval.jsonl").read_text().splitlines()]
    assert all(r["messages"][-1]["content"] == r["answer"] for r in held_out)


def test_synth_with_a_teacher_model_writes_its_responses(tmp_path, tiny_model_dir):
    from posttrain.data import read_conversations

    path = write_pipeline(
        tmp_path,
        f"stages: [synth]\nsynth: {{recipe: {QUICKSTART_RECIPE}, num_train: 12, "
        f"num_eval: 4, teacher: {tiny_model_dir}, "
        f"teacher_sampling: {{backend: hf, max_new_tokens: 5, temperature: 1.0}}}}\n",
    )
    metrics = _run(path)["synth"]
    assert metrics["teacher"]["model"] == str(tiny_model_dir)
    train = read_conversations(tmp_path / "run" / "synth" / "train.jsonl", on_error="skip")
    raw = [json.loads(line) for line in (tmp_path / "run" / "synth" / "train.jsonl").read_text().splitlines()]
    assert all(r["source"] == "teacher" and "answer" in r for r in raw)
    # an untrained teacher answers (almost) never as the oracle does: the responses really are its own
    assert metrics["teacher"]["agrees_with_oracle"] < 0.5
    assert sum(r["messages"][-1]["content"] != r["answer"] for r in raw) >= len(raw) - 1
    assert len(train) <= len(raw)


def test_synth_eval_counts_add_up_to_what_was_asked():
    from posttrain.stages.synth import eval_counts

    assert eval_counts([3, 3, 3], 4) == [2, 1, 1]  # per-task rounding alone gave 1 + 1 + 1 = 3 of 4
    assert sum(eval_counts([2000, 2000, 1000, 2000, 1000, 1000, 1001], 201)) == 201  # it gave 200
    counts = eval_counts([2000, 2000, 1000, 2000, 1000, 1000, 1000, 1], 200)
    assert sum(counts) == 200 and counts[-1] == 0  # a one-row task keeps its row for training
    assert eval_counts([2, 2], 3) == [1, 1]  # never all of a task's rows: as close as it can get
