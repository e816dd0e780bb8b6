"""Time the CPU quickstart end to end: every stage of configs/quickstart.yaml in a fresh run directory.

    .venv/bin/python bench/quickstart_time.py [--threads 2] [--run-dir runs/bench-quickstart]

Prints each stage's seconds (from the manifests), the total wall time against the 5-minute budget,
the process CPU time (more stable than wall time on a shared machine) and the machine's load average,
and writes bench/results/quickstart_time.json. A second, immediate re-run measures the no-op cost of
skipping every finished stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 300.0


def _run(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, child CPU seconds and exit code of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    code = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.time() - t0, cpu, code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the quickstart's own setting is 2)")
    ap.add_argument("--run-dir", default="runs/bench-quickstart", help="fresh run directory (deleted first)")
    args = ap.parse_args()
    run_dir = REPO / args.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "posttrain.cli",
        "run",
        "configs/quickstart.yaml",
        f"run_dir={run_dir}",
        f"threads={args.threads}",
    ]
    load_before = os.getloadavg()[0]
    wall, cpu, code = _run(cmd)
    if code != 0:
        print(f"quickstart failed with exit code {code}; see {run_dir}/posttrain.log")
        return 1
    rerun_wall, _, _ = _run(cmd)
    stages = {}
    for manifest in sorted(run_dir.glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        stages[m["stage"]] = m.get("seconds")
    result = {
        "threads": args.threads,
        "total_wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "budget_s": BUDGET_S,
        "share_of_budget": round(wall / BUDGET_S, 3),
        "rerun_noop_wall_s": round(rerun_wall, 1),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "stages_s": stages,
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }
    print(f"{'stage':<10} seconds")
    for name, secs in stages.items():
        print(f"{name:<10} {secs}")
    print(
        f"total wall {wall:.1f}s = {wall / BUDGET_S:.2f}x the 5-minute budget; CPU {cpu:.1f}s; "
        f"re-run (all stages skipped) {rerun_wall:.1f}s; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    out = REPO / "bench" / "results" / "quickstart_time.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
