"""PPO step time: posttrain's `ppo` stage against TRL 1.12.0's PPOTrainer, side by side, in one run.

Both sides get the same saved models (policy = reference init, and one reward-model directory that is
the reward model AND the value init), the same prompts, rollout batch, mini-batch, PPO epochs, response
length and temperature, fp32, no gradient checkpointing, one optimiser step per mini-batch, and HF
`generate` rollouts that stop on `<end_of_turn>` (TRL: `stop_token_id`; no missing-EOS penalty on either
side). `trl-nogc` is TRL with its two `gc.collect()` calls per update made no-ops (a diagnostic). Then
our stage with vLLM rollouts: the share of the step spent in generation and in weight sync, at the tiny
size and at ~26M parameters; and at ~26M our stage with LoRA policy and value (`ours-lora-*`: one model
copy fewer, optimiser state for the adapters only, adapters folded into the weights pushed to vLLM).
Each configuration runs in its own child process (ppo_step_children.py; peak RSS = its VmHWM).

Times are means over the updates after the first (warm-up), as wall seconds and as process CPU seconds.
With one torch thread on an idle machine the two agree; on a shared machine wall time stretches with
the load while CPU time barely moves, so the CPU ratios are the ones to compare across runs.

TRL removed PPO in 1.13; 1.12.0 is installed `--no-deps` into bench/.trl112 (outside the venv) and is
imported only by the TRL child, so the venv's trl stays untouched:

    .venv/bin/python -m pip install --no-deps --target bench/.trl112 trl==1.12.0   # or pass --install-trl
    .venv/bin/python bench/ppo_step.py            # tiny + ~26M models, ~4 min idle, ~8 min under load
    .venv/bin/python bench/ppo_step.py --quick    # tiny model, 3 configurations, ~1.5 min
    .venv/bin/python bench/ppo_step.py --repeats 3   # each configuration 3 times, interleaved: medians, min-max

Results: bench/results/ppo_step.json (--quick: ppo_step_quick.json); each child's log:
bench/results/ppo_step_logs/<config>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from childproc import run_child

BENCH = Path(__file__).resolve().parent
TRL_DIR = BENCH / ".trl112"
TRL_VERSION = "1.12.0"
SIZES = {  # Llama built from config; the tokenizer (vocab 512) is shared
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384),
    "large": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1408),
}
PPO = dict(
    rollout_batch_size=16,
    mini_batch_size=8,
    ppo_epochs=2,
    max_new_tokens=32,
    temperature=1.0,
    learning_rate=1e-5,
    kl_coef=0.05,
)
"""PPO settings given to both sides."""
UPDATES = {"tiny": 8, "large": 3}
QUICK_UPDATES = {"tiny": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every child (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny model, 3 configurations, fewer updates (< 2 minutes)")
    p.add_argument("--no-large", action="store_true", help="skip the ~26M-parameter runs")
    p.add_argument("--only", help="comma-separated configuration names to run (e.g. ours-vllm-large)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="child processes per configuration, interleaved (medians and min-max reported)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--install-trl", action="store_true", help=f"pip install trl=={TRL_VERSION} into {TRL_DIR}")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/ppo_step[_quick].json)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: path of a child spec JSON
    args = p.parse_args(argv)
    args.out = args.out or BENCH / "results" / ("ppo_step_quick.json" if args.quick else "ppo_step.json")
    return args


# ---------------------------------------------------------------------------------------------- inputs


def build_inputs(work: Path, sizes: list[str], seed: int) -> dict:
    """Train data, tokenizer, and per size a policy dir and a reward-model dir (also the value init)."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.data import write_jsonl
    from posttrain.models import ModelConfig, build_tiny_model, count_parameters, save_model_dir, train_tokenizer
    from posttrain.tasks import TASKS, make_example

    rng = random.Random(seed)
    rows = [make_example(rng.choice(sorted(TASKS)), rng) for _ in range(400)]
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]] + ["user\nmodel\n"], 512)
    write_jsonl(work / "train.jsonl", rows[:256])
    out = {"train_data": str(work / "train.jsonl"), "vocab": len(tokenizer)}
    for size in sizes:
        cfg = ModelConfig(family="llama", **SIZES[size])
        policy = build_tiny_model(cfg, tokenizer, seed=seed)
        save_model_dir(policy, tokenizer, work / f"{size}-policy")
        rm_init = build_tiny_model(cfg, tokenizer, seed=seed + 1)
        save_model_dir(rm_init, tokenizer, work / f"{size}-rm-init")
        rm = AutoModelForSequenceClassification.from_pretrained(str(work / f"{size}-rm-init"), num_labels=1)
        rm.config.pad_token_id = tokenizer.pad_token_id
        save_model_dir(rm, tokenizer, work / f"{size}-rm")
        out[size] = {
            "policy": str(work / f"{size}-policy"),
            "rm": str(work / f"{size}-rm"),
            "parameters": count_parameters(policy),
            **SIZES[size],
        }
    return out


def configurations(args) -> list[dict]:
    """The configurations to run, in order. `trl-nogc` is TRL with its per-update `gc.collect()` calls
    made no-ops: a diagnostic that separates that fixed cost from the PPO work itself."""
    runs = [("ours", "hf", "tiny"), ("trl", "hf", "tiny"), ("trl-nogc", "hf", "tiny"), ("ours", "vllm", "tiny")]
    if args.quick:
        runs.remove(("trl-nogc", "hf", "tiny"))
    elif not args.no_large:
        runs += [
            ("ours", "hf", "large"),
            ("trl", "hf", "large"),
            ("ours", "vllm", "large"),
            ("ours-lora", "hf", "large"),
            ("ours-lora", "vllm", "large"),
        ]
    updates = QUICK_UPDATES if args.quick else UPDATES
    configs = [
        {"name": f"{side}-{backend}-{size}", "side": side, "backend": backend, "size": size, "updates": updates[size]}
        for side, backend, size in runs
    ]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c["name"] for c in configs}
        if unknown:
            raise SystemExit(
                f"--only: unknown configuration(s) {sorted(unknown)}; known: {', '.join(c['name'] for c in configs)}"
            )
        configs = [c for c in configs if c["name"] in wanted]
    return configs


# ---------------------------------------------------------------------------------------------- parent


def ensure_trl(install: bool) -> str | None:
    """None if trl 1.12.0 is in TRL_DIR (installing it if asked), else why not."""
    if not (TRL_DIR / "trl").is_dir() and install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(TRL_DIR), f"trl=={TRL_VERSION}"]
        print("installing:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
    if not (TRL_DIR / "trl").is_dir():
        return (
            f"trl {TRL_VERSION} not found in {TRL_DIR}: run `{Path(sys.executable).name} -m pip install "
            f"--no-deps --target {TRL_DIR} trl=={TRL_VERSION}` or pass --install-trl"
        )
    return None


def summarise(result: dict, rollout: int) -> dict:
    """Means over the updates after the first (warm-up): wall and CPU seconds, phase shares, tokens/s."""
    steps = result["updates"][1:]
    mean = lambda key: statistics.fmean(s[key] for s in steps)  # noqa: E731
    out = {
        "timed_updates": len(steps),
        "step_s": mean("total"),
        "step_s_stdev": statistics.stdev(s["total"] for s in steps) if len(steps) > 1 else 0.0,
        "generate_s": mean("generate"),
        "sync_s": mean("sync"),
        "cpu_step_s": mean("cpu_total"),
        "cpu_generate_s": mean("cpu_generate"),
        "cpu_sync_s": mean("cpu_sync"),
        "tokens_per_update": mean("tokens"),
        "finished_fraction": mean("finished") / rollout,
    }
    out.update(
        generate_share_wall=out["generate_s"] / out["step_s"],
        sync_share_wall=out["sync_s"] / out["step_s"],
        generate_share_cpu=out["cpu_generate_s"] / out["cpu_step_s"],
        sync_share_cpu=out["cpu_sync_s"] / out["cpu_step_s"],
        tokens_per_s_wall=out["tokens_per_update"] / out["step_s"],
        tokens_per_cpu_s=out["tokens_per_update"] / out["cpu_step_s"],
        generate_tokens_per_cpu_s=out["tokens_per_update"] / out["cpu_generate_s"],
    )
    return out


def print_table(report: dict) -> None:
    rows = [
        (
            "config",
            "params",
            "wall s/update",
            "CPU s/update",
            "gen share wall/CPU",
            "sync share wall/CPU",
            "tok/update",
            "tok/CPU-s",
            "gen tok/CPU-s",
            "peak RSS MiB",
        )
    ]
    for name, r in report["runs"].items():
        if "error" in r:
            rows.append((name, "-", "FAILED", *[""] * 7))
            continue
        s = r["summary"]
        gen_share = f"{100 * s['generate_share_wall']:.1f}%/{100 * s['generate_share_cpu']:.1f}%"
        sync_share = f"{100 * s['sync_share_wall']:.2f}%/{100 * s['sync_share_cpu']:.2f}%"
        cpu = f"{s['cpu_step_s']:.2f}"
        if r.get("spread"):
            lo, hi = r["spread"]["cpu_step_s"]
            cpu += f" [{lo:.2f}-{hi:.2f}]"
        rows.append(
            (
                name,
                f"{r['parameters'] / 1e6:.2f}M",
                f"{s['step_s']:.2f} ±{s['step_s_stdev']:.2f}",
                cpu,
                gen_share,
                sync_share,
                f"{s['tokens_per_update']:.0f}",
                f"{s['tokens_per_cpu_s']:.0f}",
                f"{s['generate_tokens_per_cpu_s']:.0f}",
                f"{r['peak_rss_mib']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print()
    print(f"{'ratio':28s} {'wall step':>10s} {'CPU step':>10s} {'peak RSS':>10s}")
    for label, value in report["ratios"].items():
        cells = (
            [f"{value[k]:.2f}x" for k in ("wall_step", "cpu_step", "peak_rss")] if isinstance(value, dict) else [value]
        )
        print(f"{label:28s} " + " ".join(f"{c:>10s}" for c in cells))
    for name, r in report["runs"].items():
        if "error" in r:
            print(f"\n{name} FAILED: {r['error']}\n  log: {r['log']}")
    print(
        f"\nload average (1 min) before/after each child: {report['load_average_1m']} "
        f"({os.cpu_count()} cores); CPU times are the load-robust numbers"
    )


PAIRS = [
    ("ours-hf / trl (tiny)", "ours-hf-tiny", "trl-hf-tiny"),
    ("ours-hf / trl-nogc (tiny)", "ours-hf-tiny", "trl-nogc-hf-tiny"),
    ("ours-hf / trl (large)", "ours-hf-large", "trl-hf-large"),
    ("ours-vllm / ours-hf (tiny)", "ours-vllm-tiny", "ours-hf-tiny"),
    ("ours-vllm / ours-hf (large)", "ours-vllm-large", "ours-hf-large"),
    ("ours-lora-hf / ours-hf (large)", "ours-lora-hf-large", "ours-hf-large"),
    ("ours-lora-vllm / ours-vllm (large)", "ours-lora-vllm-large", "ours-vllm-large"),
]
"""Ratios a/b reported for every pair whose two configurations both ran."""


def ratios(runs: dict) -> dict:
    def metrics(name):
        run = runs.get(name, {})
        if "summary" not in run:
            return None
        return {
            "wall_step": run["summary"]["step_s"],
            "cpu_step": run["summary"]["cpu_step_s"],
            "peak_rss": run["peak_rss_mib"],
        }

    out = {}
    for label, a, b in PAIRS:
        if a in runs and b in runs:
            ma, mb = metrics(a), metrics(b)
            out[label] = {k: ma[k] / mb[k] for k in ma} if ma and mb else "n/a (a run failed)"
    return out


def combine(results: list[dict]) -> dict:
    """One configuration's repeats as one record: the median of every summary figure and of peak RSS, the
    min-max of CPU and wall seconds per update, and each repeat's own record."""
    good = [r for r in results if "error" not in r]
    if not good:
        return results[-1]
    if len(results) == 1:
        return good[0]
    summary = {k: statistics.median(r["summary"][k] for r in good) for k in good[0]["summary"]}
    spread = {
        k: [min(r["summary"][k] for r in good), max(r["summary"][k] for r in good)] for k in ("cpu_step_s", "step_s")
    }
    return {
        "summary": summary,
        "spread": spread,
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in good),
        "parameters": good[0]["parameters"],
        "repeats": results,
        "failed_repeats": len(results) - len(good),
        "load_avg_1m_after": good[-1]["load_avg_1m_after"],
    }


def run_configuration(cfg: dict, inputs: dict, work: Path, log_dir: Path, args) -> dict:
    """One configuration in its own process, with its summary (or the reason it did not run)."""
    size = inputs[cfg["size"]]
    print(f"[{cfg['name']}] {size['parameters'] / 1e6:.2f}M params, {cfg['updates']} updates ...", flush=True)
    if cfg["side"].startswith("trl") and inputs["trl_problem"]:
        print(f"  skipped: {inputs['trl_problem']}", flush=True)
        return {"error": inputs["trl_problem"], "log": "-", "load_avg_1m_after": os.getloadavg()[0]}
    spec = {
        **cfg,
        "threads": args.threads,
        "seed": args.seed,
        "policy": size["policy"],
        "rm": size["rm"],
        "train_data": inputs["train_data"],
        "trl_dir": str(TRL_DIR),
        "trl_version": TRL_VERSION,
        "ppo": PPO,
    }
    result = run_child(__file__, spec, work, log_dir, {"TRL_EXPERIMENTAL_SILENCE": "1"})
    if "error" in result:
        print(f"  FAILED: {result['error']}", flush=True)
        return result
    result.update(parameters=size["parameters"], summary=summarise(result, PPO["rollout_batch_size"]))
    print(
        f"  {result['summary']['step_s']:.2f} s/update ({result['summary']['cpu_step_s']:.2f} CPU s), peak RSS "
        f"{result['peak_rss_mib']:.0f} MiB, process {result['process_seconds']:.0f} s",
        flush=True,
    )
    return result


def parent(args) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # building the inputs is not news
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    configs = configurations(args)
    sizes = sorted({c["size"] for c in configs}, key=list(SIZES).index)
    log_dir = args.out.parent / "ppo_step_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()[0]]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "quick": args.quick,
        "ppo": PPO,
        "torch": torch.__version__,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="ppo_step_bench_") as tmp:
        work = Path(tmp)
        inputs = {**build_inputs(work, sizes, args.seed), "trl_problem": ensure_trl(args.install_trl)}
        report.update(
            vocab=inputs["vocab"],
            models={s: {k: v for k, v in inputs[s].items() if k not in ("policy", "rm")} for s in sizes},
        )
        repeats: dict[str, list[dict]] = {c["name"]: [] for c in configs}
        for rep in range(args.repeats):  # interleaved: every configuration once, then again
            for cfg in configs:
                run = {**cfg, "name": cfg["name"] + (f"-r{rep}" if args.repeats > 1 else "")}
                repeats[cfg["name"]].append(run_configuration(run, inputs, work, log_dir, args))
                loads.append(repeats[cfg["name"]][-1]["load_avg_1m_after"])
        report["runs"] = {name: combine(results) for name, results in repeats.items()}
    report["load_average_1m"] = [round(x, 2) for x in loads]
    report["ratios"] = ratios(report["runs"])
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.replace(args.out)  # atomic: a reader never sees half a file
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli = parse_args()
    if cli.child:
        from ppo_step_children import child_main

        child_main(cli.child)
    else:
        parent(cli)
