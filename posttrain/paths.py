"""What a path given to posttrain must be, checked before any work: a file, a directory, or a model
directory whose weights are complete safetensors files. Errors say what was found instead.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's byte
range, and the data; a file cut short (an interrupted copy or download) is shorter than the largest
range, which is checked from the header alone, without reading the weights.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

REWARD_HEAD_FILE = "reward_head.json"
"""Beside a causal LM's weights: it is an implicit reward model (posttrain/implicit_rm.py)."""
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def describe(path: Path) -> str:
    """What is at `path`, for error messages."""
    if not path.exists():
        return "nothing (the path does not exist)"
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        return (
            f"a directory holding {entries[:8]}{' ...' if len(entries) > 8 else ''}"
            if entries
            else "an empty directory"
        )
    return f"a file of {path.stat().st_size} bytes"


def check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: expected a file, found {describe(path)}")
    return path


def check_safetensors_file(path: Path) -> None:
    """Raise ValueError unless `path` is a whole safetensors file (header parsed, data not cut short)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); the file is corrupt or truncated") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise ValueError(f"{path}: truncated safetensors file: {size} bytes, its header needs {needed}")


def check_model_dir(path: str | Path) -> Path:
    """Raise ValueError (or FileNotFoundError) unless `path` is a local Hugging Face model directory whose
    safetensors weights are all present and whole. Pickle weights are never loaded."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path}: expected a model directory, found {describe(path)}")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json); found {describe(path)}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(
            p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern) if p.name != "training_args.bin"
        )
        hint = (
            (
                f" (found {', '.join(pickles)}: pickle weights are never loaded, since unpickling runs code; "
                f"convert them to safetensors first)"
            )
            if pickles
            else f"; found {describe(path)}"
        )
        raise ValueError(f"{path}: no *.safetensors weights{hint}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ValueError(f"{path}: {index.name} names shards that are missing: {missing}")
    for file in weights:
        check_safetensors_file(file)
    return path


def check_writable_dir(path: str | Path) -> Path:
    """Raise ValueError unless `path` is, or can become, a directory (no file in the way, writable)."""
    path = Path(path).resolve()
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{path}: cannot be a directory: {parent} is {describe(parent)}")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"{path}: cannot be created or written: {parent} is not writable")
            return path
    return path


def check_reward_model(path: str) -> None:
    """Refuse a directory that holds no trained reward head: loading a causal LM (an SFT model, say) as a
    sequence scorer would give it a new, random head and score with it without a word."""
    d = Path(path)
    adapter, config = d / "adapter_config.json", d / "config.json"
    if (d / REWARD_HEAD_FILE).is_file():  # an implicit reward model: the causal LM is the scorer
        return
    if adapter.is_file():
        task = json.loads(adapter.read_text()).get("task_type")
        if task == "SEQ_CLS":
            return
        got = f"a LoRA adapter of task_type {task!r}"
    else:
        archs = (json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return
        got = f"a model of architectures {archs}"
    raise ValueError(
        f"{path}: not a reward model: it holds {got}. A reward model is the rm stage's output: a sequence "
        f"classifier, or a causal LM with {REWARD_HEAD_FILE} (rm.head: implicit); scoring a plain causal LM "
        f"would use a new, untrained head"
    )
