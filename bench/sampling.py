"""Drawing one token per row: the HF engine's `draw_tokens` (inverse CDF in float64) against what
transformers' `generate` does (softmax, then torch.multinomial), 32 rows, at vocabularies 512 and 262144.

    .venv/bin/python bench/sampling.py            # ~1 min

Prints CPU milliseconds per draw (median of --repeats timings of --calls draws each) and the ratio ours / HF.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from posttrain.engines.hf import draw_tokens


def hf_draw(logits: torch.Tensor) -> torch.Tensor:
    """generate's sampling step at T=1, top-p 1."""
    return torch.multinomial(torch.softmax(logits, -1), num_samples=1).squeeze(1)


def cpu_ms(fn, logits: torch.Tensor, calls: int, repeats: int) -> float:
    fn(logits)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn(logits)
        times.append((time.process_time() - start) / calls * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampling.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    print("| vocab | rows | HF generate's draw (ms) | draw_tokens (ms) | ours / HF |\n|---:|---:|---:|---:|---:|")
    for vocab, calls in [(512, 400), (262144, 4)]:
        logits = torch.randn(args.rows, vocab) * 3
        hf = cpu_ms(hf_draw, logits, calls, args.repeats)
        ours = cpu_ms(lambda x: draw_tokens(x, 1.0, 1.0), logits, calls, args.repeats)
        results.append({"vocab": vocab, "rows": args.rows, "hf_ms": hf, "ours_ms": ours, "ratio": ours / hf})
        print(f"| {vocab} | {args.rows} | {hf:.3f} | {ours:.3f} | {ours / hf:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
