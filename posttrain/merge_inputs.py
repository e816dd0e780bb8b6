"""Merge inputs: model directories indexed and read one tensor at a time, and the checks that they can be
merged (same architecture, tensor names, shapes and tokenizer).

`ModelSource.read` opens the safetensors file with `safe_open` for each tensor, copies it out and closes
the handle again: a handle kept open leaves every page it touched resident (measured: ru_maxrss 625 MB
after reading a 400 MB file through one handle, 249 MB re-opening per tensor).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

from .paths import check_safetensors_file
from .shards import nbytes

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied from the reference model into the merged one (never pickles, never weights)."""
CONFIG_KEYS_IGNORED = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache"}


class MergeError(ValueError):
    """Inputs or settings that cannot be merged as asked."""


# ----------------------------------------------------------------------------------------------
# Inputs: model directories read one tensor at a time


@dataclass
class ModelSource:
    """A model directory's safetensors, indexed by tensor name without loading any tensor."""

    path: Path
    config: dict
    origin: Path
    """The directory the user named (differs from `path` for a LoRA adapter merged into a temp dir)."""
    files: dict[str, Path] = field(default_factory=dict)
    """Tensor name -> shard file."""
    specs: dict[str, tuple[str, tuple]] = field(default_factory=dict)
    """Tensor name -> (safetensors dtype string, shape)."""

    @classmethod
    def open(cls, path: str | Path, origin: str | Path | None = None, need_config: bool = True) -> "ModelSource":
        path = Path(path)
        shards = whole_shards(path)
        if need_config and not (path / "config.json").is_file():
            raise MergeError(f"{path}: no config.json (not a Hugging Face model directory)")
        config = json.loads((path / "config.json").read_text()) if need_config else {}
        src = cls(path, config, Path(origin or path))
        for shard in shards:
            with _opened(shard) as f:
                for name in f.keys():
                    if name in src.files:
                        raise MergeError(f"{path}: tensor {name!r} is in both {src.files[name].name} and {shard.name}")
                    sl = f.get_slice(name)
                    src.files[name], src.specs[name] = shard, (sl.get_dtype(), tuple(sl.get_shape()))
        return src

    def read(self, name: str) -> torch.Tensor:
        """One tensor, copied out of a handle opened just for it (see the module doc for why)."""
        with _opened(self.files[name]) as f:
            return f.get_tensor(name).clone()

    def nbytes(self) -> int:
        return sum(nbytes(*spec) for spec in self.specs.values())


@contextmanager
def _opened(file: Path) -> Iterator:
    """`safe_open`, with a read failure (bad header, I/O error) re-raised naming the file: safetensors' own
    message names none."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise MergeError(f"{file}: cannot read this safetensors file ({err})") from None


def whole_shards(path: Path) -> list[Path]:
    """The weight files of the model dir `path`, each checked whole from its header alone (a file cut short
    by an interrupted copy is refused here, naming it, before any tensor is read)."""
    if not path.is_dir():
        raise MergeError(f"model directory not found: {path}")
    shards = _shard_files(path)
    for shard in shards:
        try:
            check_safetensors_file(shard)
        except ValueError as err:
            raise MergeError(str(err)) from None
    return shards


def _shard_files(path: Path) -> list[Path]:
    """The weight files of a model dir: from model.safetensors.index.json if present, else *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise MergeError(f"{index}: lists shard(s) that are missing: {', '.join(missing)}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"))]
        hint = f" (found {', '.join(pickles)}: pickle weights are never loaded)" if pickles else ""
        raise MergeError(f"{path}: no *.safetensors weights{hint}")
    return files


def expand_checkpoints(path: str | Path) -> list[Path]:
    """A model dir as itself; a training output dir of checkpoint-N subdirs as those, oldest first."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file() or not path.is_dir():
        return [path]
    steps = [
        p
        for p in path.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and list(p.glob("*.safetensors"))
    ]
    if not steps:
        raise MergeError(f"{path}: neither a model directory (config.json) nor a folder of checkpoint-N dirs")
    return sorted(steps, key=lambda p: int(p.name.split("-")[1]))


def folder_note(expanded: list[tuple[str | Path, list[Path]]]) -> str:
    """For a model count error: what each checkpoint folder among the inputs (input, its expand_checkpoints)
    held, e.g. ' (run/sft/checkpoints holds 1 checkpoint dir(s): checkpoint-57)'; '' when none is a folder."""
    held = []
    for inp, dirs in expanded:
        if dirs != [Path(inp)]:  # a folder: expanded to its checkpoint-N dirs
            names = ", ".join(d.name for d in dirs[:4]) + (", ..." if len(dirs) > 4 else "")
            held.append(f"{inp} holds {len(dirs)} checkpoint dir(s): {names}")
    return f" ({'; '.join(held)})" if held else ""


def materialize_adapter(adapter_dir: Path, tmp_root: Path) -> Path:
    """Merge a LoRA adapter into its base (whole model in memory) and save it as a plain model dir."""
    from .models import load_model

    model = load_model(adapter_dir, device="cpu")  # a weights job: merged on the CPU, in the saved dtype
    base = Path(json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    out = Path(tempfile.mkdtemp(dir=tmp_root, prefix=f"{adapter_dir.name}.merged."))
    model.save_pretrained(out, safe_serialization=True)
    for name in SIDE_FILES[1:]:  # tokenizer files: the adapter's own if it has them, else its base's
        src = adapter_dir / name if (adapter_dir / name).is_file() else base / name
        if src.is_file():
            shutil.copy2(src, out / name)
    return out


# ----------------------------------------------------------------------------------------------
# Checks


def check_compatible(sources: list[ModelSource], allow_tokenizer_mismatch: bool) -> list[str]:
    """Same architecture, tensor names, shapes and tokenizer across all sources; return warnings."""
    ref, warnings = sources[0], []
    for src in sources[1:]:
        for key in ("model_type", "architectures"):
            if src.config.get(key) != ref.config.get(key):
                raise MergeError(
                    f"architecture mismatch: {ref.path} has {key}={ref.config.get(key)!r}, "
                    f"{src.path} has {src.config.get(key)!r}"
                )
        only_ref, only_src = sorted(set(ref.specs) - set(src.specs)), sorted(set(src.specs) - set(ref.specs))
        if only_ref or only_src:
            raise MergeError(
                f"tensor names differ between {ref.path} and {src.path}: only in the first "
                f"{only_ref[:5]}{'...' if len(only_ref) > 5 else ''}, only in the second "
                f"{only_src[:5]}{'...' if len(only_src) > 5 else ''}"
            )
        for name, (_, shape) in ref.specs.items():
            if src.specs[name][1] != shape:
                raise MergeError(
                    f"shape mismatch for {name}: {list(shape)} in {ref.path}, {list(src.specs[name][1])} in {src.path}"
                )
        diff = sorted(
            k
            for k in (set(ref.config) | set(src.config)) - CONFIG_KEYS_IGNORED
            if ref.config.get(k) != src.config.get(k)
        )
        if diff:
            warnings.append(f"config.json of {src.path} differs from {ref.path} in {diff}; {ref.path}'s is used")
        problem = _tokenizer_difference(ref.path, src.path)
        if problem and not allow_tokenizer_mismatch:
            raise MergeError(f"tokenizer mismatch: {problem} (set allow_tokenizer_mismatch to merge anyway)")
        if problem:
            warnings.append(f"tokenizer mismatch allowed: {problem}")
    return warnings


def _tokenizer_difference(a: Path, b: Path) -> Optional[str]:
    """Why the tokenizers of two model dirs differ (vocab and added tokens of tokenizer.json), or None."""
    fa, fb = a / "tokenizer.json", b / "tokenizer.json"
    if not fa.is_file() and not fb.is_file():
        return None
    if not fa.is_file() or not fb.is_file():
        return f"{fa if not fa.is_file() else fb} is missing while the other model has one"

    def vocab(f: Path) -> dict:
        tok = json.loads(f.read_text())
        table = dict(tok.get("model", {}).get("vocab") or {})
        if isinstance(tok.get("model", {}).get("vocab"), list):  # unigram: [[piece, score], ...]
            table = {piece: i for i, (piece, _) in enumerate(tok["model"]["vocab"])}
        table.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
        return table

    va, vb = vocab(fa), vocab(fb)
    if va == vb:
        return None
    differing = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
    return f"{fa} and {fb} map {len(differing)} token(s) differently, e.g. {differing[:3]}"
