"""What the benchmarks that run each configuration in its own process share: starting that child with
pinned threads and reading back its JSON result, and its own memory counters.

A benchmark script is its own child (`script --child spec.json`); the child writes the file named by the
spec's "result" key. Imported by scripts run as `python bench/<name>.py` (their folder is on sys.path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def status_mib(key: str) -> float:
    """A /proc/self/status field in MiB. VmHWM is this process's peak RSS, which exec resets (getrusage's
    ru_maxrss is kept across fork+exec on Linux, so a child would report at least its parent's RSS)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def run_child(script: str, spec: dict, work: Path, log_dir: Path, extra_env: dict | None = None) -> dict:
    """Run `script --child` on one configuration in a fresh process, with `spec["threads"]` threads; its
    result plus process seconds, load averages and log path, or the reason it failed (the log's tail)."""
    spec_path, result_path = work / f"{spec['name']}.spec.json", work / f"{spec['name']}.result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    threads = str(spec["threads"])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        **(extra_env or {}),
    }
    log_path, load_before, start = log_dir / f"{spec['name']}.log", os.getloadavg()[0], time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, str(Path(script).resolve()), "--child", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(work),
            check=False,
        )
    meta = {
        "process_seconds": time.perf_counter() - start,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
        "log": str(log_path),
    }
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text().strip().splitlines()[-6:]
        return {**meta, "error": f"exit code {proc.returncode}: " + " | ".join(tail)}
    return {**meta, **json.loads(result_path.read_text())}
