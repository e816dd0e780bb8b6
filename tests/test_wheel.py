"""An installed wheel is a whole posttrain: built, installed (not editable) into a fresh environment and run
from another directory, its defaults find the shipped verifiers and unsafe-term list inside the package."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_wheel_installs_and_runs_a_pipeline_from_elsewhere(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("posttrain-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # its own pip (bundled, offline)
    site = next(venv.glob("lib/python*/site-packages"))
    # the heavy dependencies come from this environment's site-packages (a plain path entry: its editable
    # posttrain finder is not run), posttrain itself only from the wheel
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    # --ignore-installed: pip must not uninstall the posttrain it sees through deps.pth (this environment's)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        check=True,
        capture_output=True,
    )
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import posttrain, posttrain.resources as r; print(posttrain.__file__);"
            "print(r.VERIFIERS); print(r.UNSAFE_TERMS)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    files = where.stdout.split()
    assert all(f.startswith(str(venv)) and Path(f).is_file() for f in files), files

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "recipe.yaml").write_text("tasks:\n  - task: sort\n  - task: safety\n  - task: count\n")
    (work / "pipeline.yaml").write_text(
        "run_dir: run\nseed: 0\nthreads: 1\nstages: [synth, filter, base, sft, prefs, eval]\n"
        "synth: {recipe: recipe.yaml, num_train: 120, num_eval: 12}\n"
        "base: {hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 1, head_dim: 32, intermediate_size: 128, "
        "vocab_size: 300}\n"
        "sft: {max_steps: 4, batch_size: 8, eval_samples: 4}\n"
        "prefs: {best_of_n: {enabled: false}, teacher: {enabled: false}, max_train_prompts: 20, max_eval_prompts: 6}\n"
        "eval: {num_prompts: 6, memorisation: {num_examples: 2}}\n"
    )
    out = subprocess.run(
        [str(venv / "bin" / "posttrain"), "run", "pipeline.yaml"], cwd=work, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert all(s["status"] == "ran" for s in summary.values())
    report = json.loads((work / "run" / "filter" / "report.json").read_text())
    assert "unsafe_terms" in report["filters"]  # the shipped term list was found inside the package
    results = json.loads((work / "run" / "eval" / "results.json").read_text())
    assert "verifiers" in results["judges"]  # the shipped verifiers judged
