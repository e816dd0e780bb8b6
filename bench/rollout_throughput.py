"""Rollout throughput: in-process vLLM vs Hugging Face `generate`, same model, prompts and sampling.

Also times a PPO weight sync (`VLLMEngine.load_weights` of the full state dict) and its share of one
rollout batch. The model is a randomly initialised Llama of tens of millions of parameters built from
config (nothing is downloaded); at T=1 it rarely samples a stop token, so nearly every sample runs to
max_new_tokens. Runs alternate HF and vLLM so that load from other jobs hits both alike.

    .venv/bin/python bench/rollout_throughput.py            # ~29M parameters, ~3-4 min on 1 thread
    .venv/bin/python bench/rollout_throughput.py --quick    # ~5M parameters, < 1 min
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    # hidden, layers, heads, intermediate, vocab, prompts, n, max_new_tokens
    "full": dict(hidden=512, layers=8, heads=8, intermediate=1408, vocab=8000, prompts=8, n=4, max_new_tokens=128),
    "quick": dict(hidden=256, layers=4, heads=4, intermediate=704, vocab=2000, prompts=4, n=2, max_new_tokens=64),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both backends (default 1)")
    parser.add_argument("--quick", action="store_true", help="a smaller model and batch, < 1 minute")
    parser.add_argument("--repeats", type=int, default=3, help="timed rollout batches per backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rollout_throughput.json")
    return parser.parse_args(argv)


def build_tokenizer(vocab_size: int, seed: int):
    """A BPE tokenizer of about `vocab_size` tokens: task prompts plus random words give it enough merges."""
    from posttrain.models import train_tokenizer
    from posttrain.tasks import TASKS, make_example

    rng = random.Random(seed)
    texts = [make_example(rng.choice(sorted(TASKS)), rng)["messages"][0]["content"] for _ in range(2000)]
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(40_000)]
    texts += [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    return train_tokenizer(texts, vocab_size)


def build_model_dir(size: dict, tokenizer, out_dir: Path, seed: int):
    from posttrain.models import ModelConfig, build_tiny_model, count_parameters, save_model_dir

    cfg = ModelConfig(
        family="llama",
        hidden_size=size["hidden"],
        num_layers=size["layers"],
        num_heads=size["heads"],
        num_kv_heads=size["heads"],
        head_dim=size["hidden"] // size["heads"],
        intermediate_size=size["intermediate"],
        max_position_embeddings=512,
    )
    model = build_tiny_model(cfg, tokenizer, seed=seed).eval()
    save_model_dir(model, tokenizer, out_dir)
    return model, count_parameters(model)


def make_prompts(count: int, seed: int) -> list[list[dict]]:
    from posttrain.tasks import TASKS, make_example

    rng = random.Random(seed + 1)
    return [make_example(rng.choice(sorted(TASKS)), rng)["messages"][:1] for _ in range(count)]


def timed_rollout(engine, prompts, sampling) -> tuple[float, int]:
    """Seconds for one rollout batch and the completion tokens it produced."""
    start = time.perf_counter()
    results = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    return seconds, sum(len(s.token_ids) for samples in results for s in samples)


def run(args) -> dict:
    torch.set_num_threads(args.threads)  # before vLLM starts: it makes set_num_threads a no-op afterwards
    from posttrain.engines import HFEngine, SamplingConfig
    from posttrain.engines.vllm import VLLMEngine

    size = SIZES["quick" if args.quick else "full"]
    tokenizer = build_tokenizer(size["vocab"], args.seed)
    with tempfile.TemporaryDirectory(prefix="rollout_bench_") as tmp:
        model_dir = Path(tmp) / "model"
        model, n_params = build_model_dir(size, tokenizer, model_dir, args.seed)
        prompts = make_prompts(size["prompts"], args.seed)
        sampling = SamplingConfig(
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=size["max_new_tokens"],
            n=size["n"],
            batch_size=len(prompts),
            seed=args.seed,
        )
        print(
            f"llama {size['hidden']}x{size['layers']}, vocab {len(tokenizer)}, {n_params / 1e6:.1f}M parameters; "
            f"{len(prompts)} prompts x n={sampling.n}, max_new_tokens={sampling.max_new_tokens}, "
            f"{args.threads} thread(s)",
            flush=True,
        )

        hf = HFEngine(model, tokenizer)
        start = time.perf_counter()
        vllm = VLLMEngine(model_dir, tokenizer=tokenizer, seed=args.seed)
        vllm_start_s = time.perf_counter() - start
        warm = sampling.model_copy(update={"max_new_tokens": 8})
        hf.generate(prompts, warm)
        vllm.generate(prompts, warm)  # the first vLLM batch pays one-off set-up costs

        timings = {"hf": [], "vllm": []}
        for _ in range(args.repeats):
            for name, engine in (("hf", hf), ("vllm", vllm)):
                timings[name].append(timed_rollout(engine, prompts, sampling))
                seconds, tokens = timings[name][-1]
                print(f"  {name:5s} {tokens:5d} tokens in {seconds:6.2f} s", flush=True)

        state = model.state_dict()
        sync_s = statistics.median(vllm.load_weights(state.items()) for _ in range(3))
        vllm.close()

    def summary(name):
        seconds = statistics.median(s for s, _ in timings[name])
        tokens = statistics.median(t for _, t in timings[name])
        return {
            "batch_seconds": seconds,
            "tokens_per_batch": tokens,
            "tokens_per_s": tokens / seconds,
            "runs": [{"seconds": s, "tokens": t} for s, t in timings[name]],
        }

    results = {"hf": summary("hf"), "vllm": summary("vllm")}
    return {
        "size": "quick" if args.quick else "full",
        "threads": args.threads,
        "parameters": n_params,
        "model": {**size, "vocab": len(tokenizer)},
        "sampling": sampling.model_dump(),
        **results,
        "speedup_vllm_over_hf": results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"],
        "vllm_engine_start_s": vllm_start_s,
        "weight_sync_ms": sync_s * 1000,
        "weight_sync_share_of_vllm_batch": sync_s / results["vllm"]["batch_seconds"],
        "versions": {"torch": torch.__version__, "vllm": _version("vllm"), "transformers": _version("transformers")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, f"{package}-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"


def print_table(r: dict) -> None:
    rows = [("backend", "tokens/batch", "batch s", "tokens/s", "vs HF")]
    for name in ("hf", "vllm"):
        b = r[name]
        rows.append(
            (
                name,
                f"{b['tokens_per_batch']:.0f}",
                f"{b['batch_seconds']:.2f}",
                f"{b['tokens_per_s']:.0f}",
                f"{b['tokens_per_s'] / r['hf']['tokens_per_s']:.2f}x",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print(
        f"\nweight sync (full state dict, {r['parameters'] / 1e6:.1f}M params): {r['weight_sync_ms']:.1f} ms "
        f"= {100 * r['weight_sync_share_of_vllm_batch']:.2f}% of one vLLM rollout batch; "
        f"engine start {r['vllm_engine_start_s']:.1f} s"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)  # atomic: a reader never sees half a file
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
