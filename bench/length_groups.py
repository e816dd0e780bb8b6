"""Scoring a rollout in length groups (`posttrain.rollout.length_groups`) against one right-padded pass.

One training step's scoring of a GRPO rollout, as the RL stage runs it: `token_logprobs` (with entropies)
of 8 prompts x 4 samples under a Gemma 2, then the backward pass of a loss on them. The samples' lengths
are drawn from a spread (`--spread`, e.g. uniform 8..128 new tokens: sampled answers vary in length) or
from a narrow band (29..32, like bench/rl_vs_trl.py's random models), prompts 20 tokens each. Each
configuration runs with grouping on (the default) and off (`length_groups` returning None), alternating,
in one process, in alternating order; CPU seconds per step (median of --repeats) and the positions the
body ran. The narrow band is the control: it has too little padding to group, so both sides run the same.

    .venv/bin/python bench/length_groups.py                 # 1M and 26M bodies, ~3 min
    .venv/bin/python bench/length_groups.py --sizes 1m      # ~20 s
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from posttrain import rollout
from posttrain.engines import Sample
from posttrain.models import ModelConfig, build_tiny_model, train_tokenizer
from posttrain.rollout import pack_rollout, token_logprobs

SIZES = {  # the Gemma 2 bodies of bench/rl_vs_trl.py
    "1m": dict(hidden_size=128, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384),
    "26m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1408),
}
SPREADS = {"uniform 8-128": (8, 128), "narrow 29-32": (29, 32)}
PROMPTS, SAMPLES, PROMPT_TOKENS = 8, 4, 20


def rollout_batch(vocab: int, low: int, high: int, seed: int):
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(6, vocab) for _ in range(n)]  # noqa: E731  (ids 0-5: control tokens)
    prompts = [ids(PROMPT_TOKENS) for _ in range(PROMPTS)]
    rows = [(p, ids(rng.randint(low, high))) for p in prompts for _ in range(SAMPLES)]
    return pack_rollout([p for p, _ in rows], [Sample(text="", token_ids=c) for _, c in rows], pad_id=0)


def step(model, batch, weights, positions: list) -> tuple[float, int]:
    """CPU seconds and body positions of one scoring forward and backward pass."""
    positions.clear()
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    logp, _entropy = token_logprobs(model, batch, with_entropy=True)
    (logp * weights).sum().backward()
    return time.process_time() - start, sum(positions)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", default="1m,26m")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "length_groups.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = train_tokenizer([f"sample text {i} with words" for i in range(200)], 512)
    plain_groups = rollout.length_groups
    results = []
    print(
        "| body | lengths | positions: one pass | grouped | ratio | CPU s: one pass | grouped | ratio |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for size in args.sizes.split(","):
        config = ModelConfig(family="gemma2", max_position_embeddings=512, sliding_window=4096, **SIZES[size])
        model = build_tiny_model(config, tokenizer, seed=0).train()
        positions: list[int] = []
        model.model.register_forward_pre_hook(
            lambda _, args, kwargs: positions.append(kwargs["input_ids"].numel()), with_kwargs=True
        )
        for name, (low, high) in SPREADS.items():
            batch = rollout_batch(len(tokenizer), low, high, seed=1)
            weights = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(0))
            runs = {"one pass": [], "grouped": []}
            for repeat in range(args.repeats + 1):  # the first of each: warm-up
                for side in list(runs)[:: 1 if repeat % 2 else -1]:  # alternating order: ABBA...
                    rollout.length_groups = plain_groups if side == "grouped" else (lambda *_: None)
                    runs[side].append(step(model, batch, weights, positions))
            rollout.length_groups = plain_groups
            (one_cpu, grouped_cpu) = (statistics.median(c for c, _ in r[1:]) for r in runs.values())
            (one_pos, grouped_pos) = (r[-1][1] for r in runs.values())
            results.append(
                dict(size=size, lengths=name, positions=[one_pos, grouped_pos], cpu_s=[one_cpu, grouped_cpu])
            )
            print(
                f"| {size} | {name} | {one_pos} | {grouped_pos} | {grouped_pos / one_pos:.2f}x "
                f"| {one_cpu:.2f} | {grouped_cpu:.2f} | {grouped_cpu / one_cpu:.2f}x |",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
