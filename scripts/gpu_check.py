"""The GPU check (run by scripts/gpu_check.sh): the quickstart pipeline on CUDA in bf16 with vLLM rollouts,
first on one GPU, then on every visible GPU as ranks (ZeRO-3 training, colocated vLLM engines).

For each run it asserts that every stage ran on a CUDA device, that RL raised the held-out sampled reward,
and that the release directory generates in vLLM; then it prints a table of stage times and the peak GPU
memory in use during each stage (NVML, sampled every 0.2 s). Exit code 0 only if every check passed.
`--generation hf` runs every generation with HF generate on the GPU instead and checks the release with it
(for a machine without vLLM: scripts/device_kit.sh); the table says which.

    python scripts/gpu_check.py [--only-single] [--run-dir runs/gpu_check] [--generation vllm|hf]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ["synth", "filter", "base", "sft", "prefs", "rm", "ppo", "merge", "eval", "release"]
BASE = ["precision=bf16", "device=auto", "threads=4"]
COMMON = [
    *BASE,
    "ppo.sampling.backend=vllm",
    "prefs.sampling.backend=vllm",
    "eval.sampling.backend=vllm",
    "rm.auc.sampling.backend=vllm",
    "ppo.vllm.enforce_eager=true",
    "prefs.vllm.enforce_eager=true",
    "eval.vllm.enforce_eager=true",
    "rm.auc.vllm.enforce_eager=true",
]
"""The quickstart as it is, but on the GPU in bf16 with every generation in vLLM (eager: seconds to start)."""


def ranks_overrides(n: int) -> list[str]:
    """Every training stage as n ZeRO-3 ranks, every generating stage as n ranks with one engine each."""
    out = []
    for stage in ("sft", "rm", "ppo"):
        out += [f"{stage}.distributed.num_processes={n}", f"{stage}.distributed.zero_stage=3"]
    return out + [f"{stage}.distributed.num_processes={n}" for stage in ("prefs", "eval")]


class MemorySampler(threading.Thread):
    """(time, bytes used) of every GPU, every 0.2 s, through NVML."""

    def __init__(self):
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.samples: list[tuple[float, list[int]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            used = [self.nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]
            self.samples.append((time.time(), used))
            time.sleep(0.2)

    def peak(self, start: float, end: float) -> list[float]:
        window = [u for t, u in self.samples if start - 0.5 <= t <= end + 0.5]
        return [max(u[i] for u in window) / 2**30 for i in range(len(self.handles))] if window else []


def run_pipeline(run_dir: Path, overrides: list[str], log: Path, generation: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "posttrain.cli",
        "run",
        str(REPO / "configs" / "quickstart.yaml"),
        f"run_dir={run_dir}",
        *(COMMON if generation == "vllm" else BASE),
        *overrides,
    ]
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(log.read_text()[-6000:])
        raise SystemExit(f"FAILED: the pipeline exited with code {proc.returncode} (log: {log})")


def check_run(run_dir: Path, sampler: MemorySampler, label: str, generation: str) -> list[dict]:
    """Assert devices, the RL gain and that the release generates; return one table row per stage."""
    rows, failures = [], []
    for stage in STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        if manifest.get("status") != "complete":
            failures.append(f"{stage}: status {manifest.get('status')}")
        metrics = manifest.get("metrics") or {}
        device = metrics.get("device", "-")
        if stage in ("sft", "rm", "ppo") and not str(device).startswith("cuda"):
            failures.append(f"{stage}: ran on {device!r}, not a CUDA device")
        start = datetime.strptime(manifest["started"], "%Y-%m-%dT%H:%M:%S").timestamp()
        seconds = float(manifest.get("seconds") or 0)
        peak = sampler.peak(start, start + seconds)
        rows.append(
            {
                "run": label,
                "stage": stage,
                "seconds": round(seconds, 1),
                "device": device,
                "precision": metrics.get("precision", "-"),
                "generation": generation,
                "peak_gpu_gib": round(max(peak), 2) if peak else None,
            }
        )
    ppo = json.loads((run_dir / "ppo" / "summary.json").read_text())
    before, after = ppo["accuracy_before"]["sampled_reward"], ppo["accuracy_after"]["sampled_reward"]
    print(f"[{label}] ppo held-out sampled reward {before} -> {after}")
    if not after > before:
        failures.append(f"ppo: held-out sampled reward did not rise ({before} -> {after})")
    failures += release_generates(run_dir / "release" / "release", generation)
    if failures:
        raise SystemExit(f"FAILED [{label}]:\n  " + "\n  ".join(failures))
    return rows


def release_generates(release: Path, generation: str) -> list[str]:
    """The release directory loads from disk on the GPU and answers greedily with HF generate and, unless
    `--generation hf`, in vLLM."""
    code = (
        "import sys, torch; from posttrain.engines import SamplingConfig, make_engine;"
        "p=[[{'role':'user','content':'Sort these numbers: 3, 1, 2'}],[{'role':'user','content':'Who are you?'}]];"
        "g=SamplingConfig(max_new_tokens=24);"
        "out=make_engine(sys.argv[1], g, torch.device('cuda:0'), 'bf16').generate(p, g);"
        "print('release answers hf', [s[0].text for s in out]); assert all(s[0].token_ids for s in out)"
        "\nif sys.argv[2] == 'vllm':"
        "\n    from posttrain.engines.vllm import VLLMEngine"
        "\n    e=VLLMEngine(sys.argv[1], dtype='bfloat16', enforce_eager=True); out=e.generate(p, g); e.close()"
        "\n    print('release answers vllm', [s[0].text for s in out]); assert all(s[0].token_ids for s in out)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(release), generation], cwd=REPO, capture_output=True, text=True
    )
    print(proc.stdout.strip()[-500:])
    return [] if proc.returncode == 0 else [f"release does not generate ({generation}): {proc.stderr[-2000:]}"]


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/gpu_check")
    parser.add_argument("--only-single", action="store_true", help="skip the all-GPUs run")
    parser.add_argument(
        "--generation", choices=["vllm", "hf"], default="vllm", help="every generation in vLLM, or HF generate"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; skipped")
        return 0
    if args.generation == "vllm" and importlib.util.find_spec("vllm") is None:
        print("gpu_check: vLLM is not installed; install it, or run with --generation hf", file=sys.stderr)
        return 2
    n = torch.cuda.device_count()
    print(f"gpu_check: {n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    root = (REPO / args.run_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    sampler = MemorySampler()
    sampler.start()
    table = []
    env_gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = env_gpu.split(",")[0] if env_gpu else "0"
    run_pipeline(root / "one_gpu", [], root / "one_gpu.log", args.generation)
    if env_gpu is None:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = env_gpu
    table += check_run(root / "one_gpu", sampler, "1 GPU", args.generation)
    if n > 1 and not args.only_single:
        run_pipeline(root / f"{n}_gpus", ranks_overrides(n), root / f"{n}_gpus.log", args.generation)
        table += check_run(root / f"{n}_gpus", sampler, f"{n} GPUs", args.generation)
    else:
        print(f"gpu_check: {n} GPU visible: the multi-rank run (ZeRO-3, colocated engines) needs 2 or more; skipped")
    sampler.stop.set()
    print("\n| run | stage | seconds | device | precision | generation | peak GPU memory (GiB, whole GPU) |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        cells = [r[k] for k in ("run", "stage", "seconds", "device", "precision", "generation", "peak_gpu_gib")]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    (root / "table.json").write_text(json.dumps(table, indent=2))
    print("gpu_check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
