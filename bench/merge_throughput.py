"""Merge throughput and peak memory: our streaming linear merge vs mergekit's `linear`, same inputs.

Averages 3 checkpoints of a ~100M-parameter Llama (fp32, ~381 MB each, random weights built from config
and cached under --models-dir). Each merge runs in its own child process; its peak RSS is the kernel's
high-water mark reset after the imports (ru_maxrss of the child is reported too).
Inputs are read once beforehand so every merge finds them in the page cache, and the order of the runs
alternates between repeats.

    .venv/bin/python bench/merge_throughput.py                 # 1 thread, 2 repeats
    .venv/bin/python bench/merge_throughput.py --threads 2 --repeats 3

Prints a table with ratios over mergekit and the max abs difference between the outputs; writes
bench/results/merge_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def build_models(folder: Path, n: int, args) -> list[Path]:
    """n Llama checkpoints with different random weights (cached: built once, reused after)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.manifest import atomic_dir

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=True,
        dtype="float32",
    )
    tag = f"llama_h{args.hidden}_l{args.layers}_i{args.intermediate}_v{args.vocab}"
    dirs = [folder / f"{tag}_seed{s}" for s in range(n)]
    for seed, d in enumerate(dirs):
        if (d / "model.safetensors").is_file():
            continue
        print(f"building {d} ...", flush=True)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with atomic_dir(d) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        del model
    return dirs


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, inputs: list[str], out: str, threads: int) -> dict:
    """Run one merge in this process; report its time and its peak RSS.

    Imports alone briefly peak near 1 GB (mergekit pulls in transformers), and a merge can reuse that
    freed memory, so after the imports the kernel's high-water mark is reset (/proc/self/clear_refs)
    and VmHWM read after the merge is the merge's own peak. ru_maxrss (whole process) is kept too.
    """
    import torch

    torch.set_num_threads(threads)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from posttrain.merging import merge_models

    start_rss = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    started = time.perf_counter()
    if kind == "ours":
        merge_models("linear", inputs, out, backend="streaming")
    else:
        cfg = MergeConfiguration.model_validate(
            {
                "merge_method": "linear",
                "dtype": "float32",
                "models": [{"model": p, "parameters": {"weight": 1.0 / len(inputs)}} for p in inputs],
            }
        )
        run_merge(cfg, out, MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "start_rss_mb": start_rss,
        "peak_rss_mb": _status_mb("VmHWM"),
        "hwm_reset": hwm_reset,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(kind: str, inputs: list[Path], out: Path, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--out",
        str(out),
        "--threads",
        str(threads),
        "--inputs",
        *map(str, inputs),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_abs_diff(a: Path, b: Path) -> float:
    from posttrain.merging import ModelSource

    sa, sb = ModelSource.open(a), ModelSource.open(b)
    if set(sa.specs) != set(sb.specs):
        raise RuntimeError(f"outputs hold different tensors: {sorted(set(sa.specs) ^ set(sb.specs))[:5]}")
    return max(float((sa.read(k).double() - sb.read(k).double()).abs().max()) for k in sa.specs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads in each merge process")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each merge (median reported)")
    p.add_argument("--models-dir", default="/tmp/posttrain_merge_bench", help="cache of the built checkpoints")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--child", choices=["ours", "mergekit"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.inputs, args.out, args.threads)))
        return

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.models_dir)
    inputs = build_models(work, 3, args)
    input_bytes = sum(f.stat().st_size for d in inputs for f in d.glob("*.safetensors"))
    for d in inputs:  # warm the page cache so neither merge pays the first read from disk
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    kinds = {"ours": "ours (streaming)", "mergekit": "mergekit linear"}
    outs = {k: work / f"out_{k}" for k in kinds}
    runs = {k: [] for k in kinds}
    for rep in range(args.repeats):
        order = list(kinds) if rep % 2 == 0 else list(reversed(kinds))
        for kind in order:
            runs[kind].append(run_child(kind, inputs, outs[kind], args.threads))
            r = runs[kind][-1]
            print(
                f"  repeat {rep + 1} {kind:<13} {r['seconds']:.2f} s  peak {r['peak_rss_mb']:.0f} MB "
                f"(start {r['start_rss_mb']:.0f} MB, ru_maxrss {r['ru_maxrss_mb']:.0f} MB)",
                flush=True,
            )
    diffs = {"ours": max_abs_diff(outs["ours"], outs["mergekit"])}

    rows = {}
    for kind, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        peak = max(r["peak_rss_mb"] for r in rs)
        start = statistics.median(r["start_rss_mb"] for r in rs)
        rows[kind] = {
            "seconds_median": round(secs, 3),
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "input_gb_per_s": round(input_bytes / 1e9 / secs, 3),
            "peak_rss_mb": round(peak, 1),
            "peak_above_start_mb": round(peak - start, 1),
            "ru_maxrss_mb": round(max(r["ru_maxrss_mb"] for r in rs), 1),
            "hwm_reset": all(r["hwm_reset"] for r in rs),
        }
    base = rows["mergekit"]
    print(
        f"\nlinear average of 3 x {input_bytes / 3 / 1e6:.0f} MB fp32 checkpoints (largest tensor "
        f"{args.vocab * args.hidden * 4 / 1e6:.0f} MB), {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"{'':<24}" + "".join(f"{label:>20}" for label in kinds.values()) + f"{'ours/mk':>16}")
    for key, label in [
        ("seconds_median", "seconds"),
        ("input_gb_per_s", "input GB/s"),
        ("peak_rss_mb", "peak RSS MB"),
        ("peak_above_start_mb", "peak above start MB"),
        ("ru_maxrss_mb", "ru_maxrss MB"),
    ]:
        print(
            f"{label:<24}" + "".join(f"{rows[k][key]:>20}" for k in kinds) + f"{rows['ours'][key] / base[key]:>16.2f}"
        )
    for k, d in diffs.items():
        print(f"max abs diff {kinds[k]} vs mergekit: {d:.3g}")
    if not base["hwm_reset"]:
        print("note: /proc/self/clear_refs was not writable; peaks include the imports")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "merge_throughput",
        "threads": args.threads,
        "repeats": args.repeats,
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "intermediate": args.intermediate,
            "vocab": args.vocab,
            "dtype": "float32",
            "checkpoints": [str(d) for d in inputs],
        },
        "input_bytes": input_bytes,
        **rows,
        "ratio_over_mergekit": {
            k: {
                m: round(rows[k][m] / base[m], 3)
                for m in ("seconds_median", "input_gb_per_s", "peak_rss_mb", "peak_above_start_mb")
            }
            for k in ("ours",)
        },
        "max_abs_diff_vs_mergekit": diffs,
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (RESULTS / "merge_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'merge_throughput.json'}")


if __name__ == "__main__":
    main()
