"""Converting a user's data set into posttrain's rows: our streaming converter against `datasets` load + map.

The parent writes an Alpaca-layout Parquet file (instruction, input — empty for half the rows — output, plus
task and answer metadata) of --rows rows to a temp dir; generation is not timed. Then, each in a fresh child
process (threads pinned, peak RSS = the child's VmHWM):
  - ours-<N>: `posttrain.data.convert_to_jsonl({"path": ..., "limit": N})` on the first N rows (default 10%):
    the same converter on fewer rows, to show its memory does not grow with the row count;
  - ours: `convert_to_jsonl` on all rows: datasets streaming reads Arrow batches, each row is converted and
    validated (roles, empty turns) and written as one JSON line to a temp file renamed into place;
  - datasets: `load_dataset("parquet", ...)` (Arrow cache), `.map(alpaca_to_messages, remove_columns=...)`
    with the same conversion minus our validation, then `.to_json(...)` to the same JSONL;
  - datasets-<N>: the same on a file of N rows (it cannot stop early), for how its memory grows.
The parent then checks the two JSONL outputs hold the same rows, line by line, and prints rows/s (wall
and CPU), peak RSS, the disk the datasets cache used, and our/datasets ratios.

    .venv/bin/python bench/data_convert.py                   # 1M rows, ~7 min at load ~9 on 2 cores
    .venv/bin/python bench/data_convert.py --rows 100000     # quicker
Results: bench/results/data_convert.json; child logs in bench/results/data_convert_logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from childproc import run_child, status_mib

BENCH = Path(__file__).resolve().parent
WORDS = (
    "sort reverse count upper list numbers letters words apples seven three blue green river stone "
    "quick lazy fox dog table chair write read answer question please short long"
).split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the generated Parquet file")
    p.add_argument("--small", type=int, help="rows for the ours-<N> run (default: rows // 10)")
    p.add_argument("--threads", type=int, default=1, help="threads in every child (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "data_convert.json", help="results JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: path of a child spec JSON
    args = p.parse_args(argv)
    args.small = args.small or max(args.rows // 10, 1)
    return args


# ---------------------------------------------------------------------------------------------- parent
def generate(path: Path, n: int, seed: int) -> None:
    """An Alpaca-layout Parquet file, written 100k rows at a time (the parent's memory stays small)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    with pq.ParquetWriter(
        path, pa.schema([(c, pa.string()) for c in ("instruction", "input", "output", "task", "answer")])
    ) as w:
        for lo in range(0, n, 100_000):
            cols: dict[str, list] = {c: [] for c in ("instruction", "input", "output", "task", "answer")}
            for _ in range(min(100_000, n - lo)):
                answer = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
                cols["instruction"].append(" ".join(rng.choices(WORDS, k=rng.randint(6, 20))).capitalize() + ".")
                cols["input"].append("" if rng.random() < 0.5 else " ".join(rng.choices(WORDS, k=rng.randint(3, 30))))
                cols["output"].append(answer.capitalize() + ".")
                cols["task"].append(rng.choice(("sort", "count", "reverse")))
                cols["answer"].append(answer)
            w.write_table(pa.table(cols))


def same_rows(a: Path, b: Path) -> int:
    """Count of lines, after checking the two JSONL files hold equal rows in the same order."""
    n = 0
    with open(a) as fa, open(b) as fb:
        for n, (x, y) in enumerate(zip(fa, fb, strict=True), 1):
            if json.loads(x) != json.loads(y):
                raise AssertionError(f"line {n} differs:\n{x}{y}")
    return n


def run_configuration(name: str, spec: dict, work: Path, args) -> dict:
    print(f"[{name}] ...", flush=True)
    r = run_child(
        __file__,
        {"name": name, "threads": args.threads, **spec},
        work,
        args.out.parent / "data_convert_logs",
        {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_CACHE": spec["cache"]},
    )
    if "rows" not in r:
        print(f"  FAILED: {r['error']}", flush=True)
        raise SystemExit(1)
    r["rows_per_s"], r["rows_per_cpu_s"] = r["rows"] / r["seconds"], r["rows"] / r["cpu_seconds"]
    print(
        f"  {r['rows']} rows in {r['seconds']:.1f} s ({r['rows_per_s']:,.0f} rows/s, "
        f"{r['rows_per_cpu_s']:,.0f} per CPU s), peak RSS {r['peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    return r


def parent(args) -> None:
    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    (args.out.parent / "data_convert_logs").mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "rows": args.rows,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="data_convert_bench_") as tmp:
        work = Path(tmp)
        data = work / "alpaca.parquet"
        generate(data, args.rows, args.seed)
        report["parquet_mib"] = data.stat().st_size / 2**20
        small = work / "alpaca_small.parquet"  # the baseline cannot stop early: give it a file of --small rows
        generate(small, args.small, args.seed)
        for name, spec in (
            (f"ours-{args.small}", {"mode": "ours", "limit": args.small}),
            (f"datasets-{args.small}", {"mode": "datasets", "data": str(small)}),
            ("ours", {"mode": "ours"}),
            ("datasets", {"mode": "datasets"}),
        ):
            spec = {
                "data": str(data),
                **spec,
                "output": str(work / f"{name}.jsonl"),
                "cache": str(work / f"hf_cache_{name}"),
            }
            report["runs"][name] = run_configuration(name, spec, work, args)
            loads.append(report["runs"][name]["load_avg_1m_after"])
        report["outputs_equal_rows"] = same_rows(work / "ours.jsonl", work / "datasets.jsonl")
    runs = report["runs"]
    ours, base = runs["ours"], runs["datasets"]
    report["ratios"] = {
        "rows_per_s": ours["rows_per_s"] / base["rows_per_s"],
        "rows_per_cpu_s": ours["rows_per_cpu_s"] / base["rows_per_cpu_s"],
        "peak_rss": ours["peak_rss_mib"] / base["peak_rss_mib"],
        "peak_rss_ours_all_vs_small": ours["peak_rss_mib"] / runs[f"ours-{args.small}"]["peak_rss_mib"],
        "peak_rss_datasets_all_vs_small": base["peak_rss_mib"] / runs[f"datasets-{args.small}"]["peak_rss_mib"],
    }
    report.update(load_average_1m=[round(x, 2) for x in loads], total_seconds=time.perf_counter() - start)
    print_table(report)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.replace(args.out)  # atomic: a reader never sees half a file
    print(f"wrote {args.out}")


def print_table(report: dict) -> None:
    print(
        f"\n{report['rows']:,} rows of Alpaca-layout Parquet ({report['parquet_mib']:.0f} MiB), "
        f"{report['threads']} thread(s), load average {report['load_average_1m']}"
    )
    print(
        f"{'run':<14} {'rows':>9} {'wall s':>7} {'rows/s':>9} {'rows/CPU s':>11} {'peak RSS MiB':>13} {'cache MiB':>10}"
    )
    for name, r in report["runs"].items():
        print(
            f"{name:<14} {r['rows']:>9} {r['seconds']:>7.1f} {r['rows_per_s']:>9,.0f} {r['rows_per_cpu_s']:>11,.0f} "
            f"{r['peak_rss_mib']:>13.0f} {r.get('cache_mib', 0):>10.0f}"
        )
    q = report["ratios"]
    print(
        f"ours / datasets: {q['rows_per_s']:.2f}x rows/s, {q['rows_per_cpu_s']:.2f}x rows per CPU s, "
        f"{q['peak_rss']:.2f}x peak RSS; outputs equal ({report['outputs_equal_rows']} rows)"
    )
    small = list(report["runs"])[0].split("-")[1]
    print(
        f"peak RSS, all rows / {small} rows: ours {q['peak_rss_ours_all_vs_small']:.2f}x, "
        f"datasets {q['peak_rss_datasets_all_vs_small']:.2f}x"
    )


# ---------------------------------------------------------------------------------------------- child
def alpaca_to_messages(ex: dict) -> dict:
    """The baseline's conversion: the same rows our `alpaca` format makes, without its checks."""
    user = f"{ex['instruction']}\n\n{ex['input']}" if ex["input"].strip() else ex["instruction"]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}]}


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    phases = {}
    wall, cpu = time.perf_counter(), time.process_time()
    if spec["mode"] == "ours":
        from posttrain.data import SkipReport, convert_to_jsonl

        report = SkipReport()
        source = {"path": spec["data"], **({"limit": spec["limit"]} if spec.get("limit") else {})}
        rows = convert_to_jsonl(source, spec["output"], skipped=report)
        assert report.skipped == 0, report.as_dict()
    else:
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files={"train": [spec["data"]]}, split="train")
        phases["load_s"] = time.perf_counter() - wall
        ds = ds.map(alpaca_to_messages, remove_columns=["instruction", "input", "output"])
        phases["map_s"] = time.perf_counter() - wall - phases["load_s"]
        ds.to_json(spec["output"], force_ascii=False)
        phases["to_json_s"] = time.perf_counter() - wall - phases["load_s"] - phases["map_s"]
        rows = len(ds)
    result = {
        "rows": rows,
        "seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_mib": status_mib("VmHWM"),
        "cache_mib": dir_mib(Path(spec["cache"])),
        "max_rss_getrusage_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **phases,
    }
    Path(spec["result"]).write_text(json.dumps(result))
    print(f"child {spec['name']} done: {result}", flush=True)


if __name__ == "__main__":
    cli = parse_args()
    child_main(cli.child) if cli.child else parent(cli)
