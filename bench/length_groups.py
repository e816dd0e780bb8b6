"""Scoring a rollout in length groups (`posttrain.rollout.length_groups`) against one right-padded pass.

One training step's scoring of a rollout of 8 prompts x 4 samples under Gemma 2 bodies, as the RL stage
runs it, then the backward pass of a loss on it: the policy's `token_logprobs` (with entropies), and PPO's
per-token values (`token_values`, a one-label sequence classifier). The samples' lengths are drawn from a
spread (uniform 8..128 new tokens: sampled answers vary in length) or from a narrow band (29..32, like
bench/rl_vs_trl.py's random models), prompts 20 tokens each. Sides: grouping on (the default) and off
(`length_groups` returning None); for values also the value model run over every position of every row,
as `token_values` did before it took the policy's way. Sides alternate in one process (ABBA...); CPU
seconds per step (median of --repeats) and the positions the body ran. The narrow band is the control for
grouping: it has too little padding to group, so "one pass" and "grouped" run the same code there.

    .venv/bin/python bench/length_groups.py                 # 1M and 26M bodies, ~8 min
    .venv/bin/python bench/length_groups.py --sizes 1m      # ~1 min
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
from posttrain.attention import register
from posttrain.models import ModelConfig, build_tiny_model, tiny_config, train_tokenizer
from posttrain.rollout import pack_rollout, token_logprobs, token_values

SIZES = {  # the Gemma 2 bodies of bench/rl_vs_trl.py
    "1m": dict(hidden_size=128, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384),
    "26m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1408),
}
SIDES = {"policy": ["one pass", "grouped"], "values": ["whole rows", "one pass", "grouped"]}
"""one pass: `length_groups` off; whole rows: the value model over every position (before PPO's values went
the policy's lean way)."""
SPREADS = {"uniform 8-128": (8, 128), "narrow 29-32": (29, 32)}
PROMPTS, SAMPLES, PROMPT_TOKENS = 8, 4, 20


def rollout_batch(vocab: int, low: int, high: int, seed: int):
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(6, vocab) for _ in range(n)]  # noqa: E731  (ids 0-5: control tokens)
    prompts = [ids(PROMPT_TOKENS) for _ in range(PROMPTS)]
    rows = [(p, ids(rng.randint(low, high))) for p in prompts for _ in range(SAMPLES)]
    return pack_rollout([p for p, _ in rows], [Sample(text="", token_ids=c) for _, c in rows], pad_id=0)


def logprobs_loss(model, batch, weights):
    logp, _entropy = token_logprobs(model, batch, with_entropy=True)
    return (logp * weights).sum()


def values_loss(model, batch, weights):
    return (token_values(model, batch) * weights).sum()


def whole_rows_values_loss(model, batch, weights):
    """`token_values` before it ran response positions only: the backbone over every position of every row."""
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    values = torch.nn.functional.pad(model.score(hidden).squeeze(-1)[:, :-1], (1, 0)) * batch.response_mask
    return (values * weights).sum()


LOSSES = {"policy": logprobs_loss, "values": values_loss}


def step(model, loss_of, batch, weights, positions: list) -> tuple[float, int]:
    """CPU seconds and body positions of one scoring forward and backward pass."""
    positions.clear()
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    loss_of(model, batch, weights).backward()
    return time.process_time() - start, sum(positions)


def models(size: str, tokenizer):
    """The policy (a causal LM) and a value model (a one-label sequence classifier) of one body size."""
    from transformers import AutoModelForSequenceClassification

    config = ModelConfig(family="gemma2", max_position_embeddings=512, sliding_window=4096, **SIZES[size])
    policy = build_tiny_model(config, tokenizer, seed=0).train()
    value_config = tiny_config(config, tokenizer)
    value_config.num_labels = 1
    value = AutoModelForSequenceClassification.from_config(value_config, attn_implementation=register())
    return {"policy": (policy, policy.model), "values": (value.train(), value.model)}


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
        "| body | scorer | lengths | side | body positions | CPU s | ratio to the first side |\n"
        "|---|---|---|---|---:|---:|---:|"
    )
    for size in args.sizes.split(","):
        for scorer, (model, body) in models(size, tokenizer).items():
            positions: list[int] = []
            body.register_forward_pre_hook(
                lambda _, args, kwargs: positions.append(kwargs["input_ids"].numel()), with_kwargs=True
            )
            for name, (low, high) in SPREADS.items():
                batch = rollout_batch(len(tokenizer), low, high, seed=1)
                weights = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(0))
                runs = {side: [] for side in SIDES[scorer]}
                for repeat in range(args.repeats + 1):  # the first of each: warm-up
                    for side in list(runs)[:: 1 if repeat % 2 else -1]:  # alternating order: ABBA...
                        rollout.length_groups = plain_groups if side == "grouped" else (lambda *_: None)
                        loss_of = whole_rows_values_loss if side == "whole rows" else LOSSES[scorer]
                        runs[side].append(step(model, loss_of, batch, weights, positions))
                rollout.length_groups = plain_groups
                cpu = {side: statistics.median(c for c, _ in r[1:]) for side, r in runs.items()}
                first = next(iter(cpu))
                for side, r in runs.items():
                    results.append(
                        dict(
                            size=size,
                            scorer=scorer,
                            lengths=name,
                            side=side,
                            positions=r[-1][1],
                            cpu_s=cpu[side],
                            ratio=cpu[side] / cpu[first],
                        )
                    )
                    print(
                        f"| {size} | {scorer} | {name} | {side} | {r[-1][1]} | {cpu[side]:.2f} "
                        f"| {cpu[side] / cpu[first]:.2f}x |",
                        flush=True,
                    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
