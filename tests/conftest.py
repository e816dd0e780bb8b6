"""Shared test setup: one CPU thread, no hub access, and small generated data/tokenizers/models."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
QUICKSTART_RECIPE = str(REPO / "data" / "recipes" / "quickstart.yaml")
"""The shipped quickstart recipe, by absolute path (tests may run from any directory)."""

TINY = dict(
    hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128, vocab_size=300
)
"""Architecture fields of the tiny test models (~0.1M parameters)."""


def make_rows(n: int, seed: int = 0, tasks=("sort", "safety", "count", "reverse")) -> list[dict]:
    from posttrain.tasks import make_example

    rng = random.Random(seed)
    return [make_example(rng.choice(tasks), rng) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from posttrain.models import train_tokenizer

    texts = [m["content"] for r in make_rows(400) for m in r["messages"]] + ["user\nmodel\n"]
    return train_tokenizer(texts, TINY["vocab_size"])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama model directory (random weights)."""
    from posttrain.models import ModelConfig, build_tiny_model, save_model_dir

    out = tmp_path_factory.mktemp("models") / "llama"
    model = build_tiny_model(ModelConfig(family="llama", **TINY), tiny_tokenizer, seed=0)
    return save_model_dir(model, tiny_tokenizer, out)


def write_pipeline(tmp_path, body: str) -> str:
    """Write a pipeline YAML into tmp_path (run_dir inside it) and return its path."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\n" + body)
    return str(path)
