"""Throughput and memory of the filter stage's streaming core (posttrain.stages.filter.FilterStream).

Generates synthetic conversational rows (clean, PII, exact and near duplicates, unsafe, wrong identity,
unfinished) to a temp file first, so generation is not timed. Then, each measurement in a fresh child
process (clean peak RSS, threads pinned):
  - baseline: read + parse + read the messages as the stage does + write every line (the floor any filter pays);
  - all filters on the first 100k rows and on all rows: rows/s, peak RSS, dedup-index bytes;
  - each filter alone vs all filters on a --per-filter-rows prefix;
  - near-dedup baseline: datasketch MinHash + MinHashLSH, row by row, vs our batched NearDupIndex.

    .venv/bin/python bench/filter_throughput.py                 # 1M rows (~3.5 min at load 1 on 2 cores)
    .venv/bin/python bench/filter_throughput.py --rows 200000   # quicker
Writes bench/results/filter_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILTERS = ["structure", "pii", "unsafe_terms", "identity", "classifier", "eval_overlap", "exact_dup", "near_dup"]
OFF = {
    "structure": {"enabled": False},
    "pii": {"enabled": False},
    "unsafe": {"enabled": False},
    "identity": {"enabled": False},
    "dedup": {"exact": False, "near": False, "eval_overlap": False},
}
IDENTITY = {"release_name": "Posttrain-Tiny", "release_maker": "the posttrain authors"}
HOOK = "def score(texts):\n    return [0.9 if 'forbidden' in t else 0.1 for t in texts]\n"


# ------------------------------------------------------------------------------------ data generation


def make_vocab(rng: random.Random, n: int = 6000) -> list[str]:
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "si", "de", "pa", "gu", "fe", "ho", "ji", "wa", "zo"]
    return sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(n)})


def clean_row(rng: random.Random, vocab: list[str]) -> dict:
    user = " ".join(rng.choices(vocab, k=rng.randint(6, 18))).capitalize() + "?"
    answer = " ".join(rng.choices(vocab, k=rng.randint(8, 30))).capitalize() + "."
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "task": "gen"}


PII = [
    "Mail me at {w}.{w}@example.com.",
    "Call +44 20 7946 0958 later.",
    "Card 4111 1111 1111 1111 ok.",
    "SSN 123-45-6789 on file.",
    "Server 10.1.{n}.7 is down.",
    "Ring (555) 123-4567 now.",
]
UNSAFE = ["Step one: build a pipe bomb from {w}.", "You should kill yourself, {w}.", "This is forbidden {w}."]
IDENTITY_BAD = ["I am ChatGPT, made by OpenAI.", "As a Llama model, I think {w}.", "I was trained by Acme Labs."]


def generate(path: Path, n: int, seed: int = 0) -> dict:
    """Write n rows: ~75% clean, 4% PII, 5% exact dups, 5% near dups, 4% unsafe, 4% identity, 3% unfinished."""
    rng = random.Random(seed)
    vocab = make_vocab(rng)
    recent: list[dict] = []
    counts: dict[str, int] = {}
    with open(path, "w") as f:
        for i in range(n):
            kind = rng.choices(
                ["clean", "pii", "exact", "near", "unsafe", "identity", "unfinished"], [75, 4, 5, 5, 4, 4, 3]
            )[0]
            row = clean_row(rng, vocab)
            w, num = rng.choice(vocab), rng.randint(0, 255)
            if kind == "pii":
                row["messages"][0]["content"] += " " + rng.choice(PII).format(w=w, n=num)
            elif kind in ("exact", "near") and recent:
                row = json.loads(json.dumps(rng.choice(recent)))
                msg = row["messages"][1]
                if kind == "exact":
                    msg["content"] = msg["content"].upper().rstrip(".") + "!"
                else:
                    words = msg["content"].split()
                    words[rng.randrange(len(words))] = rng.choice(vocab)  # one word changed
                    msg["content"] = " ".join(words)
            elif kind == "unsafe":
                row["messages"][1]["content"] = rng.choice(UNSAFE).format(w=w)
            elif kind == "identity":
                row["messages"][1]["content"] = rng.choice(IDENTITY_BAD).format(w=w)
            elif kind == "unfinished":
                row["finished"] = False
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "clean":
                recent.append(row)
                if len(recent) > 2000:
                    recent.pop(rng.randrange(len(recent)))
            f.write(json.dumps(row) + "\n")
    return counts


def head(src: Path, dst: Path, n: int) -> Path:
    with open(src) as fin, open(dst, "w") as fout:
        for i, line in enumerate(fin):
            if i >= n:
                break
            fout.write(line)
    return dst


# ------------------------------------------------------------------------------------ child measurements


class RSSSampler(threading.Thread):
    """Peak resident set size, sampled every 50 ms (and ru_maxrss at the end as a cross-check)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)


def child_filter(args) -> dict:
    from posttrain.stages.filter import FilterConfig, FilterStream

    cfg = FilterConfig.model_validate(json.loads(args.cfg))
    stream = FilterStream(cfg, args.eval)
    sampler = RSSSampler()
    rss_start = sampler.rss()
    sampler.start()
    marks = {}

    def on_batch(rows: int) -> None:  # memory when the first 100k rows are done, within the same run
        if rows >= 100_000 and "rss_at_100k" not in marks:
            marks["rss_at_100k"] = sampler.rss()
            marks["index_bytes_at_100k"] = index_bytes(stream)

    t0, cpu0 = time.perf_counter(), time.process_time()
    report = stream.run(args.src, Path(args.workdir) / "out.jsonl", on_batch=on_batch)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    sampler.stop.set()
    sampler.join()
    return {
        "rows": report["rows"],
        "seconds": seconds,
        "cpu_seconds": cpu,
        "kept": report["kept"],
        "rss_start": rss_start,
        "rss_peak": max(sampler.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "index_bytes": index_bytes(stream),
        **marks,
        "dropped": {k: v["dropped"] for k, v in report["filters"].items() if v["enabled"]},
    }


def index_bytes(stream) -> int:
    return stream.exact.nbytes + (stream.near.nbytes if stream.near is not None else 0)


def child_io(args) -> dict:
    """The floor: each line read, parsed and its messages read as the stage reads them, then written."""
    from posttrain.data.formats import normalise_messages
    from posttrain.data.readers import parse_line

    t0, cpu0 = time.perf_counter(), time.process_time()
    n = 0
    with open(args.src, "rb") as fin, open(Path(args.workdir) / "io.jsonl", "wb") as fout:
        for line in fin:
            normalise_messages(parse_line(line)["messages"])
            fout.write(line)
            n += 1
    return {
        "rows": n,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def child_datasketch(args) -> dict:
    """Near-dedup the datasketch way (MinHash objects, one LSH query/insert per row) vs our NearDupIndex,
    both with the stage's rule and defaults: rows with answers of 16+ words, answer Jaccard >= 0.7 found by
    LSH, prompt Jaccard >= 0.05 confirmed."""
    from datasketch import MinHash, MinHashLSH

    from posttrain.dedup import NearDupIndex
    from posttrain.filters import normalise

    prompts, answers = [], []
    with open(args.src) as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            prompts.append(" ".join(normalise(m["content"]) for m in msgs if m["role"] != "assistant"))
            answers.append(" ".join(normalise(m["content"]) for m in msgs if m["role"] == "assistant"))
    sampler = RSSSampler()
    out = {"rows": len(answers)}
    ours = NearDupIndex()
    base, t0, cpu0 = sampler.rss(), time.perf_counter(), time.process_time()
    dups = 0
    for i in range(0, len(answers), 1024):
        found = ours.add_batch(prompts[i : i + 1024], answers[i : i + 1024], list(range(i, i + 1024)))
        dups += sum(d is not None for d in found)
    out["ours"] = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "dropped": dups,
        "rss_growth": sampler.rss() - base,
        "index_bytes": ours.nbytes,
    }
    del ours
    lsh, template, kept = MinHashLSH(threshold=0.7, num_perm=128), MinHash(num_perm=128, seed=1), {}

    def minhash(text: str) -> MinHash:
        m = template.copy()
        m.update_batch([text[j : j + 5].encode() for j in range(max(len(text) - 4, 1))])
        return m

    base, t0, cpu0 = sampler.rss(), time.perf_counter(), time.process_time()
    dups = 0
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if answer.count(" ") + 1 < 16:
            continue
        a, p = minhash(answer), minhash(prompt)
        if any(a.jaccard(kept[c][0]) >= 0.7 and p.jaccard(kept[c][1]) >= 0.05 for c in lsh.query(a)):
            dups += 1
        else:
            lsh.insert(i, a)
            kept[i] = (a, p)
    out["datasketch"] = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "dropped": dups,
        "rss_growth": sampler.rss() - base,
    }
    return out


# ------------------------------------------------------------------------------------------ orchestration


def spawn(mode: str, threads: int, **kw) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
    }
    cmd = [sys.executable, __file__, "--child", mode, "--threads", str(threads)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def config_for(only: str | None, hook: Path) -> dict:
    cfg = json.loads(json.dumps(OFF)) if only else {}
    full = {"structure": {}, "pii": {}, "unsafe": {"classifier": f"{hook}:score"}, "identity": IDENTITY, "dedup": {}}
    if only is None:
        return {**full, "on_error": "skip"}
    section = {
        "structure": ("structure", {"enabled": True}),
        "pii": ("pii", {"enabled": True}),
        "unsafe_terms": ("unsafe", {"enabled": True}),
        "identity": ("identity", {"enabled": True, **IDENTITY}),
        "classifier": ("unsafe", {"enabled": False, "classifier": f"{hook}:score"}),
        "eval_overlap": ("dedup", {**OFF["dedup"], "eval_overlap": True}),
        "exact_dup": ("dedup", {**OFF["dedup"], "exact": True}),
        "near_dup": ("dedup", {**OFF["dedup"], "near": True}),
    }[only]
    cfg[section[0]] = section[1]
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--per-filter-rows", type=int, default=200_000)
    ap.add_argument("--baseline-rows", type=int, default=100_000, help="rows for the datasketch near-dedup baseline")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "filter_throughput.json"))
    ap.add_argument("--child"), ap.add_argument("--src"), ap.add_argument("--cfg"), ap.add_argument("--eval")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        fn = {"filter": child_filter, "io": child_io, "datasketch": child_datasketch}[args.child]
        print(json.dumps(fn(args)))
        return
    run(args)


def run(args) -> None:
    with tempfile.TemporaryDirectory(prefix="filter_bench_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        mix = generate(tmp / "all.jsonl", args.rows)
        generate(tmp / "eval.jsonl", 5000, seed=1)
        small = head(tmp / "all.jsonl", tmp / "small.jsonl", min(100_000, args.rows))
        prefix = head(tmp / "all.jsonl", tmp / "prefix.jsonl", min(args.per_filter_rows, args.rows))
        base_src = head(tmp / "all.jsonl", tmp / "base.jsonl", min(args.baseline_rows, args.rows))
        hook = tmp / "hook.py"
        hook.write_text(HOOK)
        print(f"generated {args.rows} rows in {time.perf_counter() - t0:.1f}s: {mix}", flush=True)
        common = {"threads": args.threads, "workdir": tmp}
        runs = {"io baseline": spawn("io", src=tmp / "all.jsonl", **common)}
        for name, src in (("all filters, 100k", small), (f"all filters, {args.rows // 1000}k", tmp / "all.jsonl")):
            runs[name] = spawn(
                "filter", src=src, cfg=json.dumps(config_for(None, hook)), eval=tmp / "eval.jsonl", **common
            )
            print(f"{name}: {runs[name]['rows'] / runs[name]['cpu_seconds']:.0f} rows/cpu-s", flush=True)
        per_filter = {
            "all": spawn(
                "filter", src=prefix, cfg=json.dumps(config_for(None, hook)), eval=tmp / "eval.jsonl", **common
            )
        }
        for name in FILTERS:
            per_filter[name] = spawn(
                "filter", src=prefix, cfg=json.dumps(config_for(name, hook)), eval=tmp / "eval.jsonl", **common
            )
        near = spawn("datasketch", src=base_src, **common)
    report(args, mix, runs, per_filter, near)


def report(args, mix, runs, per_filter, near) -> None:
    """Print the tables (rates from CPU seconds: on a shared machine wall time swings, CPU time much less)."""
    mb = lambda b: b / 2**20  # noqa: E731
    rate = lambda r: r["rows"] / r["cpu_seconds"]  # noqa: E731
    io_rate = rate(runs["io baseline"])
    print(f"\nthreads={args.threads}  rows={args.rows}  mix={mix}\n")
    print(
        f"{'run':<22}{'rows':>9}{'wall s':>8}{'cpu s':>8}{'rows/cpu-s':>11}{'io / run':>9}{'RSS start':>10}"
        f"{'RSS peak':>9}{'index':>8}"
    )
    for name, r in runs.items():
        print(
            f"{name:<22}{r['rows']:>9}{r['seconds']:>8.1f}{r['cpu_seconds']:>8.1f}{rate(r):>11.0f}"
            f"{io_rate / rate(r):>9.1f}{mb(r.get('rss_start', 0)):>9.0f}M{mb(r['rss_peak']):>8.0f}M"
            f"{mb(r.get('index_bytes', 0)):>7.0f}M"
        )
    big = runs[f"all filters, {args.rows // 1000}k"]
    if "rss_at_100k" in big:
        print(
            f"\nmemory in the {args.rows // 1000}k run: RSS {mb(big['rss_at_100k']):.0f}M at 100k rows "
            f"(dedup index {mb(big['index_bytes_at_100k']):.0f}M), peak {mb(big['rss_peak']):.0f}M by the end "
            f"(index {mb(big['index_bytes']):.0f}M): RSS grew {mb(big['rss_peak'] - big['rss_at_100k']):.0f}M, "
            f"the index {mb(big['index_bytes'] - big['index_bytes_at_100k']):.0f}M"
        )
    all_cpu, n = per_filter["all"]["cpu_seconds"], per_filter["all"]["rows"]
    print(f"\neach filter alone vs all, {n} rows (each run includes the read/parse/write floor)")
    print(f"{'filter':<14}{'wall s':>8}{'cpu s':>8}{'rows/cpu-s':>11}{'cpu / all':>10}{'dropped':>9}")
    for name, r in per_filter.items():
        print(
            f"{name:<14}{r['seconds']:>8.1f}{r['cpu_seconds']:>8.1f}{rate(r):>11.0f}"
            f"{r['cpu_seconds'] / all_cpu:>10.2f}{sum(r['dropped'].values()):>9}"
        )
    o, d = near["ours"], near["datasketch"]
    print(
        f"\nnear-dedup alone on {near['rows']} rows (stage defaults: answers of 16+ words, answer Jaccard >= 0.7, "
        f"prompt >= 0.05, 128 perms, char 5-grams):"
    )
    for name, r in (("ours (batched, compact)", o), ("datasketch MinHash+LSH", d)):
        print(
            f"  {name:<24}{near['rows'] / r['cpu_seconds']:>8.0f} rows/cpu-s  +{mb(r['rss_growth']):.0f}M RSS  "
            f"{r['dropped']} dropped"
        )
    print(
        f"  datasketch takes x{d['cpu_seconds'] / o['cpu_seconds']:.1f} the CPU time and "
        f"x{d['rss_growth'] / max(o['rss_growth'], 1):.1f} the memory"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
                "mix": mix,
                "runs": runs,
                "per_filter": per_filter,
                "near_dedup": near,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
