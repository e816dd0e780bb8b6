"""rm step cost: the `implicit` reward head against the `sequence_classification` head, same data and model.

Both heads start from one saved tiny Gemma 2 (quickstart size: hidden 128, 4 layers, 4/2 heads, head_dim 32,
MLP 384), train on the same pairs (reference answer vs a corruption of it, as prefs makes them), batch 16 pairs,
max_length 128, lr 5e-5 (configs/quickstart.yaml's rm), each built by the rm stage's own functions:
- seq-cls: `load_reward_init(.., "sequence_classification")` + `build_trainer` (TRL's RewardTrainer), a scalar
  head on the last non-pad token's hidden state;
- implicit: `load_reward_init(.., "implicit")` + `build_implicit_trainer` (our Trainer), r = β · mean log π of
  the answer tokens: vocabulary logits at the answer tokens only, in chunks (`rollout.token_logprobs`);
each with `gradient_checkpointing` on (the stage default) and off (`-nockpt`, the quickstart's setting).
Vocabularies 512 (the quickstart's) and 32768 (same body after `resize_token_embeddings`; the tokenizer uses
the first 512 ids), for the cost of full-vocabulary logits (real Gemma has 256k).

Each configuration runs in its own process: peak RSS is its VmHWM, "train Δ" that minus the RSS before
`train()`. Per step (after the warm-up steps) wall and process CPU seconds, CPU being the load-robust one;
"outside" is the CPU share between on_step_end and the next on_step_begin (fetching and collating the batch,
both heads' pairs being tokenised up front; logging); "sys" is the kernel's share of train()'s CPU time (page
faults: glibc hands buffers over 32 MB back to the OS when freed). No checkpoint is written.

    .venv/bin/python bench/rm_heads.py            # vocab 512 and 32768, 5 + 30 steps each, ~2 min at 1 thread
    .venv/bin/python bench/rm_heads.py --quick    # vocab 512 only, 3 + 10 steps, < 1 min

Results: bench/results/rm_heads.json (--quick: rm_heads_quick.json); child logs in bench/results/rm_heads_logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from childproc import run_child, status_mib

BENCH = Path(__file__).resolve().parent
BODY = dict(
    family="gemma2", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384
)
TOKENIZER_VOCAB = 512
HEADS = {
    "seq-cls": ("sequence_classification", True),
    "implicit": ("implicit", True),
    "seq-cls-nockpt": ("sequence_classification", False),
    "implicit-nockpt": ("implicit", False),
}
"""Configuration name -> (rm.head, rm.gradient_checkpointing)."""
RM = dict(batch_size=16, max_length=128, learning_rate=5e-5, logging_steps=10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every child (default 1)")
    p.add_argument("--quick", action="store_true", help="vocab 512 only, 3 warm-up + 10 timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/rm_heads[_quick].json)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: path of a child spec JSON
    args = p.parse_args(argv)
    args.vocabs = [TOKENIZER_VOCAB] if args.quick else [TOKENIZER_VOCAB, 32768]
    args.warmup, args.steps = (3, 10) if args.quick else (5, 30)
    args.out = args.out or BENCH / "results" / ("rm_heads_quick.json" if args.quick else "rm_heads.json")
    return args


# ---------------------------------------------------------------------------------------------- parent


def make_pairs(n: int, seed: int) -> list[dict]:
    """n task rows -> chosen = the reference answer, rejected = one corruption of it (prefs' kinds)."""
    from posttrain.data import prompt_of
    from posttrain.stages.prefs import CORRUPTIONS_FOR_TASK, corruptions_for
    from posttrain.tasks import TASKS, make_example

    rng = random.Random(seed)
    kinds = sorted({k for ks in CORRUPTIONS_FOR_TASK.values() for k in ks})
    pairs = []
    while len(pairs) < n:
        row = make_example(rng.choice(sorted(TASKS)), rng)
        for _, text in corruptions_for(row, kinds, 1, rng):
            rejected = prompt_of(row) + [{"role": "assistant", "content": text}]
            pairs.append({"chosen": row["messages"], "rejected": rejected})
    return pairs


def build_inputs(work: Path, vocabs: list[int], n_pairs: int, seed: int) -> dict:
    """The pairs (those within max_length for both heads) and one saved causal LM per vocabulary size."""
    from posttrain.pairs import tokenize_pairs
    from posttrain.models import ModelConfig, build_tiny_model, count_parameters, save_model_dir, train_tokenizer

    pairs = make_pairs(n_pairs, seed)
    texts = [m["content"] for p in pairs for m in p["chosen"] + p["rejected"][-1:]] + ["user\nmodel\n"]
    tokenizer = train_tokenizer(texts, TOKENIZER_VOCAB)
    pairs = [p for p, t in zip(pairs, tokenize_pairs(tokenizer, pairs)) if t.length <= RM["max_length"]]
    (work / "pairs.json").write_text(json.dumps(pairs))
    out = {"pairs": str(work / "pairs.json"), "n_pairs": len(pairs), "models": {}}
    for vocab in vocabs:
        model = build_tiny_model(ModelConfig(**BODY), tokenizer, seed=seed)
        if vocab != len(tokenizer):
            model.resize_token_embeddings(vocab, mean_resizing=False)
        save_model_dir(model, tokenizer, work / f"lm-{vocab}")
        out["models"][vocab] = {"dir": str(work / f"lm-{vocab}"), "lm_parameters": count_parameters(model)}
    return out


def summarise(steps: list[dict], warmup: int) -> dict:
    """Means over the steps after the warm-up."""
    timed = steps[warmup:]
    mean = lambda key: statistics.fmean(s[key] for s in timed)  # noqa: E731
    return {
        "timed_steps": len(timed),
        "wall_step_s": mean("wall"),
        "cpu_step_s": mean("cpu"),
        "wall_step_stdev": statistics.stdev(s["wall"] for s in timed),
        "outside_share_cpu": 1 - mean("cpu_inside") / mean("cpu"),
    }


def print_table(report: dict) -> None:
    print(
        "\n| vocab | head | params | CPU s/step | wall s/step | outside (CPU) | sys (CPU) | peak RSS MiB "
        "| train Δ MiB | implicit / this (CPU, peak RSS) |\n|---:|---|" + "---:|" * 8
    )
    for name, r in report["runs"].items():
        vocab, head = name.split("/")
        if "error" in r:
            print(f"| {vocab} | {head} | FAILED: {r['error'][:200]} |")
            continue
        s, ratio = r["summary"], report["ratios"].get(name)
        cells = [
            vocab,
            head,
            f"{r['parameters'] / 1e6:.2f}M",
            f"{s['cpu_step_s']:.3f}",
            f"{s['wall_step_s']:.3f} ±{s['wall_step_stdev']:.3f}",
            f"{100 * s['outside_share_cpu']:.0f}%",
            f"{100 * r['sys_share_cpu']:.0f}%",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['peak_rss_mib'] - r['rss_before_train_mib']:.0f}",
            f"{ratio['cpu_step']:.2f}x, {ratio['peak_rss']:.2f}x" if ratio else "-",
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\nload average (1 min) before/after each child: {report['load_average_1m']} ({os.cpu_count()} cores); "
        f"{report['threads']} torch thread(s); {report['n_pairs']} pairs; total {report['total_seconds']:.0f} s"
    )


def ratios(runs: dict, vocabs: list[int]) -> dict:
    """implicit / seq-cls with the same vocabulary and checkpointing: CPU and wall s/step, peak RSS."""
    out = {}
    for vocab in vocabs:
        for suffix in ("", "-nockpt"):
            a, name = runs.get(f"{vocab}/implicit{suffix}", {}), f"{vocab}/seq-cls{suffix}"
            b = runs.get(name, {})
            if "summary" in a and "summary" in b:
                out[name] = {
                    "cpu_step": a["summary"]["cpu_step_s"] / b["summary"]["cpu_step_s"],
                    "wall_step": a["summary"]["wall_step_s"] / b["summary"]["wall_step_s"],
                    "peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"],
                }
    return out


def run_configuration(vocab: int, head: str, inputs: dict, work: Path, args) -> dict:
    """One (vocabulary, head) in its own process, with its summary (or the reason it failed)."""
    name = f"{vocab}-{head}"
    print(f"[{name}] {args.warmup} + {args.steps} steps ...", flush=True)
    spec = {
        "name": name,
        "head": HEADS[head][0],
        "checkpointing": HEADS[head][1],
        "threads": args.threads,
        "seed": args.seed,
        "model": inputs["models"][vocab]["dir"],
        "pairs": inputs["pairs"],
        "max_steps": args.warmup + args.steps,
    }
    r = run_child(
        __file__,
        spec,
        work,
        args.out.parent / "rm_heads_logs",
        {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    if "steps" not in r:
        print(f"  FAILED: {r['error']}", flush=True)
        return r
    r["summary"] = summarise(r.pop("steps"), args.warmup)
    print(
        f"  {r['summary']['cpu_step_s']:.3f} CPU s/step, peak RSS {r['peak_rss_mib']:.0f} MiB, "
        f"process {r['process_seconds']:.0f} s",
        flush=True,
    )
    return r


def parent(args) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # building the inputs is not news
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    (args.out.parent / "rm_heads_logs").mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "quick": args.quick,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "body": BODY,
        "rm": RM,
        "torch": torch.__version__,
        "runs": {},
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    with tempfile.TemporaryDirectory(prefix="rm_heads_bench_") as tmp:
        inputs = build_inputs(Path(tmp), args.vocabs, (args.warmup + args.steps) * RM["batch_size"] + 64, args.seed)
        report["n_pairs"] = inputs["n_pairs"]
        for vocab in args.vocabs:
            for head in HEADS:
                report["runs"][f"{vocab}/{head}"] = r = run_configuration(vocab, head, inputs, Path(tmp), args)
                loads.append(r["load_avg_1m_after"])
    report.update(
        load_average_1m=[round(x, 2) for x in loads],
        ratios=ratios(report["runs"], args.vocabs),
        total_seconds=time.perf_counter() - start,
    )
    print_table(report)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.replace(args.out)  # atomic: a reader never sees half a file
    print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------------------- child


def step_clock():
    """A TrainerCallback marking (wall, CPU) at train begin and at each step's begin and end (its `steps()`
    gives per-step times), and cancelling the end-of-training save that save_strategy=steps would make."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_train_begin(self, *a, **kw):
            self.ends.append((time.perf_counter(), time.process_time()))  # step 1 starts where training does

        def on_step_begin(self, *a, **kw):
            self.begins.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            self.ends.append((time.perf_counter(), time.process_time()))
            control.should_save = False
            return control

        def steps(self) -> list[dict]:
            """Wall and CPU from the previous step's end (data and logging included), CPU from begin to end."""
            return [
                {"wall": e[0] - p[0], "cpu": e[1] - p[1], "cpu_inside": e[1] - b[1]}
                for p, b, e in zip(self.ends, self.begins, self.ends[1:])
            ]

    return StepClock()


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from posttrain.models import count_parameters, load_tokenizer
    from posttrain.pairs import tokenize_pairs
    from posttrain.stages.rm import RMConfig, build_implicit_trainer, build_trainer, load_reward_init, pairs_dataset

    rows = json.loads(Path(spec["pairs"]).read_text())
    tokenizer = load_tokenizer(spec["model"])
    model = load_reward_init(spec["model"], spec["seed"], spec["head"])
    cfg = RMConfig(
        head=spec["head"],
        max_steps=spec["max_steps"],
        save_steps=10**9,
        eval_steps=10**9,
        gradient_checkpointing=spec["checkpointing"],
        auc={"prompts": 0},
        **RM,
    )
    out_dir = Path.cwd() / f"out-{spec['name']}"
    if spec["head"] == "implicit":
        trainer = build_implicit_trainer(
            model, tokenizer, tokenize_pairs(tokenizer, rows), [], cfg, out_dir, spec["seed"]
        )
    else:
        trainer = build_trainer(model, tokenizer, pairs_dataset(rows, False), None, cfg, out_dir, spec["seed"])
    clock = step_clock()
    trainer.add_callback(clock)
    rss_before, before = status_mib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF)
    trainer.train()
    after = resource.getrusage(resource.RUSAGE_SELF)
    kernel, user = after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime
    steps = clock.steps()
    if len(steps) != spec["max_steps"] or len(trainer.train_dataset) != len(rows):  # TRL must drop no pair
        raise RuntimeError(f"{len(steps)}/{spec['max_steps']} steps, {len(trainer.train_dataset)}/{len(rows)} pairs")
    result = {
        "steps": steps,
        "peak_rss_mib": status_mib("VmHWM"),
        "rss_before_train_mib": rss_before,
        "sys_share_cpu": kernel / (kernel + user),
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "parameters": count_parameters(model),
        "attn_implementation": model.config._attn_implementation,
        "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "checkpoints_written": sorted(p.name for p in out_dir.glob("checkpoint-*")),
    }
    Path(spec["result"]).write_text(json.dumps(result))
    print(f"child {spec['name']} done:", {k: v for k, v in result.items() if k != "steps"}, flush=True)


if __name__ == "__main__":
    cli = parse_args()
    child_main(cli.child) if cli.child else parent(cli)
