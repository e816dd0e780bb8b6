"""Generation engines: one protocol (`generate`, `load_weights`, `sleep`/`wake`, `close`), two backends
(HF generate, vLLM in this process), and `make_engine`, the only factory. See factory.py for how ranks
share generation."""

from .base import Sample, SamplingConfig, VLLMOptions, chat_prompt_ids
from .factory import generate_all, generate_own, make_engine
from .hf import HFEngine, greedy_texts

__all__ = [
    "HFEngine",
    "Sample",
    "SamplingConfig",
    "VLLMOptions",
    "chat_prompt_ids",
    "generate_all",
    "generate_own",
    "greedy_texts",
    "make_engine",
]
