"""Distillation vs training from scratch on the same tokens (the Gemma 2 ablation, at toy scale).

Gemma 2 (section 3, Table 7 of the report) trains its small models on a teacher's next-token
distribution instead of one-hot next tokens, and reports a 2B model at ~67.8 average with distillation
vs ~60 from scratch on the same data. Here, on the synthetic instruction data of the quickstart recipe:

1. teacher: a larger Gemma 2 (default hidden 256 x 4 layers) trained with SFT to good accuracy;
2. scratch: a small Gemma 2 student (default hidden 96 x 2) trained with SFT (next-token NLL);
3. distill_a<alpha>: the same student (same init, data, steps, batch, LR schedule, seed) trained by the
   distill stage on offline top-k forward KL against the teacher, alpha * KD + (1 - alpha) * NLL.
   alpha 0 is a control: NLL only, through the distill stage's own code path (it should match scratch).

Every model is then measured the same way on the held-out split: token-weighted NLL / perplexity of the
reference answers (assistant tokens), forward KL(teacher || model) at T=1, and greedy task accuracy.
Each arm is an ordinary pipeline in its own run dir under --run-dir: re-running skips finished stages
(the teacher, ~9 min at 1 thread on a busy 2-core machine, is trained once). The teacher top-k cache is
shared by the distill arms (built by the first, reused by the others).

    .venv/bin/python bench/distill_vs_scratch.py                       # threads 1, student seed 0
    .venv/bin/python bench/distill_vs_scratch.py --seeds 0,1 --alphas 0,0.5

Prints a table with ratios (distill / scratch); writes bench/results/distill_vs_scratch.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (pinned)")
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "distill-bench"), help="where the arms' pipelines run")
    p.add_argument("--recipe", default=str(ROOT / "data" / "recipes" / "quickstart.yaml"))
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--teacher", default="256x4", help="teacher hidden x layers (Gemma 2)")
    p.add_argument("--student", default="96x2", help="student hidden x layers (Gemma 2)")
    p.add_argument("--teacher-epochs", type=float, default=6.0)
    p.add_argument("--student-epochs", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of teacher and students")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--alphas",
        default="0,0.5,1.0",
        help="KD weights of the distilled arms (0 = NLL only, through the distill stage: a control; 1 = pure KD)",
    )
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the teacher")
    p.add_argument("--seeds", default="0", help="student seeds (init and data order), e.g. 0,1,2")
    return p.parse_args()


def _arch(spec: str) -> dict:
    hidden, layers = (int(x) for x in spec.lower().split("x"))
    head_dim = 32
    return {
        "family": "gemma2",
        "vocab_size": 512,
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": max(1, hidden // head_dim),
        "num_kv_heads": 1,
        "head_dim": head_dim,
        "intermediate_size": 3 * hidden,
        "sliding_window": 64,
    }


def _train_cfg(args, epochs: float) -> dict:
    return {
        "learning_rate": args.lr,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "max_length": 128,
        "eval_steps": 100,
        "save_steps": 1000,
        "eval_samples": 0,
        "logging_steps": 25,
    }


def run_arm(name: str, args, seed: int, stages: list[str], base: dict, **sections) -> dict:
    """Run one pipeline (synth -> base -> sft|distill) in run_dir/<name>; return its summary.

    `seed` sets the model init and data order; the data itself always comes from --seed (synth.seed)."""
    import yaml

    from posttrain.pipeline import load_pipeline, run_pipeline

    cfg = {
        "run_dir": str(Path(args.run_dir) / name),
        "seed": seed,
        "threads": args.threads,
        "stages": stages,
        "synth": {"recipe": args.recipe, "num_train": args.num_train, "num_eval": args.num_eval},
        "base": base,
        **sections,
    }
    if seed != args.seed:
        cfg["synth"]["seed"] = args.seed  # the same data for every arm
    path = Path(args.run_dir) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"[bench] {name}: {' -> '.join(stages)} ({path})", flush=True)
    return run_pipeline(load_pipeline(str(path)))


def measure(model_dir: Path, teacher, eval_rows: list[dict], tokenizer) -> dict:
    """Held-out NLL / perplexity / KL to the teacher, and greedy accuracy per task, for one model."""
    from posttrain.distill_cache import heldout_metrics, tokenize_for_loss
    from posttrain.engines import HFEngine, SamplingConfig
    from posttrain.models import count_parameters, load_model
    from posttrain.tasks import answer_accuracy

    model = load_model(model_dir, device="cpu")
    examples = tokenize_for_loss(tokenizer, eval_rows)
    held = heldout_metrics(model, teacher, examples, tokenizer.pad_token_id)
    samples = HFEngine(model, tokenizer).generate(
        [r["messages"][:-1] for r in eval_rows], SamplingConfig(max_new_tokens=32, batch_size=100)
    )
    acc = answer_accuracy(eval_rows, [s[0].text for s in samples])
    return {"parameters": count_parameters(model), **held, "accuracy": acc}


def _train_seconds(stage_dir: Path) -> float:
    """The trainer's own train_runtime (optimizer steps only: no data generation, cache build or evals)."""
    history = json.loads((stage_dir / "metrics.json").read_text())["log_history"]
    return float(next(e["train_runtime"] for e in reversed(history) if "train_runtime" in e))


def _mean(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2


def aggregate(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per arm: the mean (and half-range over seeds) of each metric."""
    out = {}
    for arm, by_seed in runs.items():
        rs = list(by_seed.values())
        row = {"seeds": sorted(by_seed), "parameters": rs[0]["parameters"], "steps": rs[0].get("steps")}
        for key, get in [
            ("nll", lambda r: r["nll"]),
            ("perplexity", lambda r: r["perplexity"]),
            ("kl_to_teacher", lambda r: r.get("kl_to_teacher", 0.0)),
            ("accuracy", lambda r: r["accuracy"]["overall"]),
            ("train_seconds", lambda r: r["train_seconds"]),
        ]:
            row[key], row[key + "_halfrange"] = _mean([get(r) for r in rs])
        tasks = [k for k in rs[0]["accuracy"] if k not in ("overall", "n")]
        row["accuracy_per_task"] = {t: _mean([r["accuracy"][t] for r in rs])[0] for t in tasks}
        out[arm] = row
    return out


def table(summary: dict[str, dict]) -> str:
    head = (
        "model",
        "params",
        "seeds",
        "steps",
        "train s",
        "held-out NLL",
        "ppl",
        "KL to teacher",
        "accuracy",
        "NLL / scratch",
        "acc / scratch",
        "time / scratch",
    )
    base = summary["scratch"]
    pm = lambda r, k, f: f"{r[k]:{f}}" + (f" ±{r[k + '_halfrange']:{f}}" if len(r["seeds"]) > 1 else "")  # noqa: E731
    rows = [head]
    for name, r in summary.items():
        ratio = (lambda k: f"{r[k] / base[k]:.3f}") if name != "teacher" else (lambda k: "-")
        rows.append(
            (
                name,
                f"{r['parameters'] / 1e6:.2f}M",
                len(r["seeds"]),
                r["steps"],
                f"{r['train_seconds']:.0f}",
                pm(r, "nll", ".4f"),
                pm(r, "perplexity", ".3f"),
                pm(r, "kl_to_teacher", ".4f"),
                pm(r, "accuracy", ".3f"),
                ratio("nll"),
                ratio("accuracy"),
                ratio("train_seconds"),
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    fmt = lambda row: "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows[1:])])


def per_task_table(summary: dict[str, dict]) -> str:
    tasks = sorted(summary["scratch"]["accuracy_per_task"])
    lines = ["| task | " + " | ".join(summary) + " |", "|---|" + "---|" * len(summary)]
    for t in tasks:
        cells = [f"{r['accuracy_per_task'].get(t, 0):.3f}" for r in summary.values()]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    args = _args()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from posttrain.data import read_conversations
    from posttrain.models import load_model, load_tokenizer

    started = time.time()
    teacher_summary = run_arm(
        "teacher",
        args,
        args.seed,
        ["synth", "base", "sft"],
        _arch(args.teacher),
        sft=_train_cfg(args, args.teacher_epochs),
    )
    teacher_dir = Path(args.run_dir) / "teacher" / "sft" / "model"
    student, student_cfg = _arch(args.student), _train_cfg(args, args.student_epochs)
    arms: dict[str, dict[int, tuple[str, dict]]] = {}  # arm -> seed -> (stage, pipeline summary)
    for seed in [int(x) for x in args.seeds.split(",")]:
        arms.setdefault("scratch", {})[seed] = (
            "sft",
            run_arm(f"scratch_s{seed}", args, seed, ["synth", "base", "sft"], student, sft=student_cfg),
        )
        for alpha in [float(a) for a in args.alphas.split(",") if a.strip()]:
            distill = {
                **student_cfg,
                "teacher": str(teacher_dir),
                "mode": "offline",
                "alpha": alpha,
                "top_k": args.top_k,
                "temperature": args.temperature,
                "cache_dir": str(Path(args.run_dir) / "teacher_topk"),
            }  # shared: built once, reused
            arms.setdefault(f"distill_a{alpha:g}", {})[seed] = (
                "distill",
                run_arm(
                    f"distill_a{alpha:g}_s{seed}", args, seed, ["synth", "base", "distill"], student, distill=distill
                ),
            )

    teacher_data = Path(args.run_dir) / "teacher" / "synth" / "train.jsonl"
    eval_rows = read_conversations(Path(args.run_dir) / "teacher" / "synth" / "eval.jsonl")
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir, device="cpu").eval()
    runs = {
        "teacher": {
            args.seed: {
                **measure(teacher_dir, teacher, eval_rows, tokenizer),
                "train_seconds": _train_seconds(teacher_dir.parent),
                "steps": teacher_summary["sft"].get("steps"),
            }
        }
    }
    for arm, by_seed in arms.items():
        for seed, (stage, summary) in by_seed.items():
            run = Path(args.run_dir) / (f"scratch_s{seed}" if arm == "scratch" else f"{arm}_s{seed}")
            # every arm must have trained on the very same data file as the teacher
            assert (run / "synth" / "train.jsonl").read_bytes() == teacher_data.read_bytes(), f"{run}: other data"
            out = measure(run / stage / "model", teacher, eval_rows, tokenizer)
            out.update(train_seconds=_train_seconds(run / stage), steps=summary[stage].get("steps"))
            if stage == "distill":
                index = json.loads((Path(summary[stage]["cache_dir"]) / "index.json").read_text())
                out.update(cache=summary[stage].get("cache"), cache_build_seconds=index["build_seconds"])
            runs.setdefault(arm, {})[seed] = out
    summary = aggregate(runs)
    results = {"config": vars(args), "summary": summary, "runs": runs, "total_seconds": round(time.time() - started, 1)}
    report = (
        f"Distillation vs scratch (threads={args.threads}; teacher Gemma 2 {args.teacher}, "
        f"student {args.student}; "
        f"{args.num_train} train / {len(eval_rows)} held-out rows; student epochs {args.student_epochs}, "
        f"batch {args.batch_size}, lr {args.lr} cosine; offline top_k {args.top_k}, T {args.temperature}; "
        f"student seeds {args.seeds}, ± = half-range over seeds)\n\n"
        f"{table(summary)}\n\nGreedy accuracy per task (mean over seeds):\n\n{per_task_table(summary)}\n"
    )
    print("\n" + report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_vs_scratch.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / "distill_vs_scratch.md").write_text(report)
    print(f"wrote {RESULTS / 'distill_vs_scratch.json'} and .md; total {results['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
