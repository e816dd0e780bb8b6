"""Config loading: defaults, overrides, and errors that name the key, file and line."""

import subprocess
import sys

import pytest
import torch
import yaml

from posttrain.config import ConfigError, undocumented_fields
from posttrain.pipeline import load_pipeline, pipeline_model

from .conftest import write_pipeline


def test_every_field_has_a_doc():
    assert undocumented_fields(pipeline_model()) == []


def test_defaults_and_dotted_overrides(tmp_path):
    path = write_pipeline(tmp_path, "stages: [synth, base, sft]\nsft:\n  learning_rate: 0.01\n")
    cfg = load_pipeline(path, ["sft.learning_rate=3e-4", "base.family=llama", "sft.lora.enabled=true"])
    assert cfg.sft.learning_rate == 3e-4
    assert cfg.base.family == "llama"
    assert cfg.sft.lora.enabled is True
    assert cfg.sft.batch_size == 16  # a default


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = write_pipeline(tmp_path, "stages: [synth]\nsft:\n  learning_rat: 0.01\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    msg = str(err.value)
    assert "sft.learning_rat: unknown key" in msg
    assert f"{path}:4" in msg  # run_dir is line 1, stages line 2, sft line 3


def test_wrong_type_names_key_and_expectation(tmp_path):
    path = write_pipeline(tmp_path, "stages: [synth]\nsft:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"sft\.batch_size: .*integer.*'lots'.*pipeline.yaml:4"):
        load_pipeline(path)


def test_override_error_names_the_override(tmp_path):
    path = write_pipeline(tmp_path, "stages: [synth]\n")
    with pytest.raises(ConfigError, match=r"sft\.epochs: .*command-line override 'sft.epochs=-1'"):
        load_pipeline(path, ["sft.epochs=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_pipeline(path, ["sft.epochs"])


def test_a_misspelt_section_in_an_override_is_blamed_on_the_override(tmp_path):
    path = write_pipeline(tmp_path, "stages: [synth]\n")
    with pytest.raises(ConfigError, match=r"pop: unknown key  \[command-line override 'pop.learning_rate=1'\]"):
        load_pipeline(path, ["pop.learning_rate=1"])
    in_yaml = write_pipeline(tmp_path, "stages: [sft]\nsft:\n  epochs: 1\n")  # the section has a YAML line
    with pytest.raises(ConfigError, match=r"sft.foo: unknown key  \[command-line override 'sft.foo.bar=1'\]"):
        load_pipeline(in_yaml, ["sft.foo.bar=1"])


def test_a_key_set_twice_is_an_error_naming_both_lines(tmp_path):
    """YAML loaders keep the last of two equal keys silently; a config that says two things is refused."""
    path = write_pipeline(tmp_path, "stages: [synth]\nsft:\n  learning_rate: 0.01\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:6: sft.learning_rate is set twice \(first on line 4\)"):
        load_pipeline(path)
    nested = "stages: [sft]\nsft:\n  train_data: {path: a.json, format: alpaca, format: sharegpt}\n"
    with pytest.raises(ConfigError, match=r"sft.train_data.format is set twice"):
        load_pipeline(write_pipeline(tmp_path, nested))


def test_an_override_of_a_stage_the_run_leaves_out_is_said(tmp_path, capsys):
    """Every kind has a section, so `dpo.beta=2` validates on a pipeline without dpo: the command says it
    changes nothing (and runs nothing else differently)."""
    from posttrain.cli import main as cli_main

    path = write_pipeline(tmp_path, "stages: [synth]\n")
    assert cli_main(["show", path, "dpo.beta=2", "synth.num_train=10"]) == 0
    err = capsys.readouterr().err
    assert "override 'dpo.beta=2' changes nothing: dpo is not a stage of this run (synth)" in err
    assert "synth.num_train" not in err


def test_with_only_an_override_of_an_earlier_stage_is_read_and_of_a_later_one_is_said(tmp_path, capsys):
    """`--only X` fingerprints the stages before X to find their outputs: an override of one changes that."""
    from posttrain.cli import main as cli_main

    from .conftest import QUICKSTART_RECIPE

    path = write_pipeline(tmp_path, f"stages: [synth, base]\nsynth: {{recipe: {QUICKSTART_RECIPE}, num_train: 20}}\n")
    assert cli_main(["run", path, "--only", "synth", "base.hidden_size=32"]) == 0
    assert "this command runs synth and reads the stages before it; `posttrain run CONFIG --only base`" in (
        capsys.readouterr().err
    )
    cli_main(["run", path, "--only", "base", "synth.num_train=10"])  # synth, changed, has not finished
    assert "changes nothing" not in capsys.readouterr().err


def test_an_override_a_running_stage_reads_is_not_called_idle(tmp_path):
    """`--only filter sft.max_length=500` changes the filter's length limit: not a change of nothing."""
    from posttrain.pipeline import idle_overrides

    cfg = load_pipeline(write_pipeline(tmp_path, "stages: [synth, filter, base, sft]\n"))
    overrides = ["sft.max_length=500", "dpo.beta=2", "base.hidden_size=32"]
    assert [section for _, section in idle_overrides(cfg, overrides, {"filter"})] == ["dpo", "base"]


def test_missing_required_and_unknown_stage(tmp_path):
    with pytest.raises(ConfigError, match="stages: required key is missing"):
        load_pipeline(write_pipeline(tmp_path, "seed: 1\n"))
    with pytest.raises(ConfigError, match=r"stages.*unknown stage 'sftt'"):
        load_pipeline(write_pipeline(tmp_path, "stages: [synth, sftt]\n"))


def test_missing_path_rejected_before_work(tmp_path):
    path = write_pipeline(tmp_path, "stages: [base]\nbase:\n  path: /nonexistent/model\n")
    with pytest.raises(ConfigError, match=r"base\.path: .*path does not exist: '/nonexistent/model'"):
        load_pipeline(path)
    assert not (tmp_path / "run").exists()


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [synth\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_pipeline(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    from posttrain.config import dump_config

    cfg = load_pipeline(write_pipeline(tmp_path, "stages: [synth]\n"), ["sft.learning_rate=0.5"])
    again = pipeline_model().model_validate(yaml.safe_load(dump_config(cfg)))
    assert again.model_dump() == cfg.model_dump()
    assert again.sft.learning_rate == 0.5


def test_shipped_configs_validate(monkeypatch):
    """The quickstart validates as is; the GPU config fails only on its (absent) local model paths."""
    from .conftest import REPO

    monkeypatch.chdir(REPO)
    load_pipeline("configs/quickstart.yaml")
    with pytest.raises(ConfigError) as err:
        load_pipeline("configs/gemma2-2b-gpu.yaml")
    problems = str(err.value).splitlines()[1:]
    assert problems and all("path does not exist: '/models/" in line for line in problems), problems


def test_gpu_config_is_laid_out_for_one_node_of_eight(monkeypatch, tiny_model_dir):
    """With its model paths pointed at a local model, the GPU config validates, every computing stage runs as
    8 ranks in bf16, and every vLLM engine group divides the ranks (the runner checks this before any work)."""
    from posttrain.pipeline import check_devices, engine_layouts, stage_precision

    from .conftest import REPO

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the checks below need no GPU
    cfg = load_pipeline(
        "configs/gemma2-2b-gpu.yaml", [f"synth.teacher={tiny_model_dir}", f"base.path={tiny_model_dir}"]
    )
    generating = {"synth", "prefs", "ppo", "eval"}
    for name in ("synth", "sft", "prefs", "rm", "ppo", "eval"):
        scfg = getattr(cfg, name)
        assert scfg.distributed.num_processes == 8 and stage_precision(cfg, scfg) == "bf16", name
        if name in ("sft", "rm", "ppo"):
            assert scfg.distributed.zero_stage == 3, name
        layouts = engine_layouts(scfg)
        assert bool(layouts) == (name in generating), name
        assert all(processes % tp == 0 for tp, processes in layouts.values()), (name, layouts)
    assert cfg.ppo.vllm.enable_sleep_mode and cfg.ppo.sampling.gpu_memory_utilization == 0.35
    assert cfg.ppo.reference_placement == "cpu"
    with pytest.raises(ConfigError, match="ppo.reference_placement: 'cpu' moves the reference off an accelerator"):
        check_devices(cfg, list(cfg.stages))  # on this CPU machine the host-memory reference has nowhere to move
    monkeypatch.setattr("posttrain.pipeline.resolve_device", lambda spec: torch.device("cuda", 0))
    check_devices(cfg, list(cfg.stages))  # as on the GPU node: bf16, the reference placement and the layouts pass
    bad = load_pipeline(
        "configs/gemma2-2b-gpu.yaml",
        [f"synth.teacher={tiny_model_dir}", f"base.path={tiny_model_dir}", "prefs.sampling.tensor_parallel_size=3"],
    )
    with pytest.raises(ConfigError, match="prefs.sampling.tensor_parallel_size=3 does not divide prefs.distributed"):
        check_devices(bad, list(bad.stages))


def test_grpo_quickstart_differs_from_the_quickstart_only_in_rl(monkeypatch):
    from .conftest import REPO

    monkeypatch.chdir(REPO)
    ppo = load_pipeline("configs/quickstart.yaml").model_dump()
    grpo = load_pipeline("configs/quickstart-grpo.yaml").model_dump()
    assert {k for k in ppo if ppo[k] != grpo[k]} == {"run_dir", "ppo"}
    assert grpo["ppo"]["advantage"] == "grpo" and grpo["ppo"]["kl_mode"] == "loss"


def test_gpu_check_overrides_are_valid_keys(monkeypatch):
    """scripts/gpu_check.py runs the quickstart with these overrides on a GPU machine: they must stay valid
    keys of the config (this machine cannot run the check itself)."""
    import importlib.util

    from .conftest import REPO

    monkeypatch.chdir(REPO)
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    cfg = load_pipeline(
        "configs/quickstart.yaml", ["run_dir=/tmp/unused", *gpu_check.COMMON, *gpu_check.ranks_overrides(4)]
    )
    assert cfg.precision == "bf16" and cfg.ppo.sampling.backend == cfg.eval.sampling.backend == "vllm"
    assert cfg.ppo.distributed.num_processes == cfg.prefs.distributed.num_processes == 4
    assert cfg.sft.distributed.zero_stage == 3


def test_config_and_rl_stage_imports_leave_trainer_and_plotting_out():
    """Every stage's config class is imported to validate a pipeline, in every process of a run: none of
    them may pull in transformers' Trainer (with `datasets`, pandas, pyarrow: ~350 MiB of RSS) or
    matplotlib, which a process loads only when it builds a trainer or draws a plot."""
    code = (
        "import sys; from posttrain.pipeline import pipeline_model; pipeline_model(); "
        "import posttrain.stages.ppo.stage, posttrain.scoring; "
        "print([m for m in ('transformers.trainer', 'datasets', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
