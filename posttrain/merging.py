"""Merge model directories tensor by tensor: averaging, EMA, SLERP, task arithmetic, TIES, DARE, LITI.

`merge_models` is the one entry point (the merge stage and WARP call it). Two backends:
- streaming (ours, every method, the default): one tensor per input in memory at a time, each read
  through its own file handle (merge_inputs.py says why). Output shards are planned up front from the
  input headers and written as each tensor is computed, so no output shard is buffered either.
- mergekit (linear, slerp, task_arithmetic, ties): `mergekit.merge.run_merge` on the same directories.
  Its linear, slerp and task arithmetic equal ours to float32 rounding (max abs diff <= 1.5e-8 measured
  on Llama, Gemma 2, RecurrentGemma). Its TIES keeps int(density*n) entries where ours keeps
  round(density*n), so a few entries per tensor differ; its DARE rescales to the L1 norm instead of by
  1/density, so it is not offered. `backend: auto` takes mergekit only where it equals ours.
Why streaming is the default (bench/merge_throughput.py, averaging 3 x 381 MB, 1 thread): its peak
memory above the start is 0.26x mergekit's and grows with the largest tensor, not the model; it covers
every method with the tested formulas; mergekit is an optional extra. mergekit took 0.79x our time there
(3.2 vs 4.0 s, median of 2); we re-open each input file per tensor to keep memory flat (above).

The math is posttrain.algos.merge, done in float32 (float64 stays float64) and cast to the dtype of
the reference model: the base for task-vector methods, else the first input. LoRA adapter dirs are
merged into their base first (whole-model load, written to a temporary dir), then streamed like the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .algos import merge as algos
from .manifest import atomic_dir, atomic_write_json, hash_path
from .merge_inputs import (
    SIDE_FILES,
    MergeError,
    ModelSource,
    check_compatible,
    expand_checkpoints,
    folder_note,
    materialize_adapter,
)
from .shards import ST_DTYPES, TORCH_DTYPES, ShardWriter, nbytes, parse_size, plan_shards

log = logging.getLogger("posttrain")

METHODS = ("linear", "ema", "slerp", "task_arithmetic", "ties", "dare", "liti")
BASE_METHODS = {"task_arithmetic", "ties", "dare", "liti"}
"""Methods that need `base` (task vectors are taken relative to it; for liti it is the init)."""
PARAM_USERS = {
    "t": ("slerp", "liti"),
    "eta": ("liti",),
    "density": ("ties", "dare"),
    "ema_rate": ("ema",),
    "scale": ("ties",),
}
"""Setting -> the methods that read it; setting it for any other method is refused, never ignored."""
MERGEKIT_METHODS = {"linear", "slerp", "task_arithmetic", "ties"}
MERGEKIT_EXACT = {"linear", "slerp", "task_arithmetic"}
"""Methods whose mergekit result equals ours up to float32 rounding (checked in tests/test_merge.py)."""


# ----------------------------------------------------------------------------------------------
# Checks: everything refused before any tensor is computed


def check_settings(
    method: str,
    n_models: int,
    has_base: bool,
    weights,
    t,
    eta,
    density,
    ema_rate,
    scale: float,
    normalize: bool,
    allow_negative_weights: bool,
    folders: str = "",
) -> list[float]:
    """Validate a merge request; return the per-model weights it will use. `folders` (folder_note) is
    added to a wrong model count: n_models counts checkpoint-N dirs, not the folders the user named."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    needed = {"slerp": (2, 2), "liti": (1, 2), "linear": (2, None), "ema": (2, None)}.get(method, (1, None))
    lo, hi = needed
    if n_models < lo or (hi is not None and n_models > hi):
        want = f"exactly {lo}" if lo == hi else f"{lo} to {hi}" if hi else f"at least {lo}"
        raise MergeError(f"method {method} needs {want} model(s), got {n_models}{folders}")
    if method in BASE_METHODS and not has_base:
        raise MergeError(f"method {method} needs a base model (task vectors are taken relative to it): set base")
    if method not in BASE_METHODS and has_base:
        raise MergeError(
            f"method {method} does not use a base model; remove base (or use task_arithmetic/ties/dare/liti)"
        )
    given = {"t": t, "eta": eta, "density": density, "ema_rate": ema_rate, "scale": None if scale == 1.0 else scale}
    for key, value in given.items():
        if value is not None and method not in PARAM_USERS[key]:
            raise MergeError(f"{key} is only used by {'/'.join(PARAM_USERS[key])}, not by {method}; remove it")
    for key in ("eta", "density", "ema_rate"):  # no default that would be right for every model
        if given[key] is None and method in PARAM_USERS[key]:
            raise MergeError(f"method {method} needs {key} to be set")
    if method == "liti" and n_models == 1 and t is not None:
        raise MergeError("t is only used by liti with two models (it interpolates them); remove it")
    if weights is not None and method in ("ema", "slerp", "liti"):
        raise MergeError(
            f"weights are not used by {method} (it has {'ema_rate' if method == 'ema' else 't'}); remove them"
        )
    return _check_weights(method, n_models, weights, normalize, allow_negative_weights)


def _check_weights(method, n_models, weights, normalize, allow_negative_weights) -> list[float]:
    if weights is None:  # linear: uniform soup; task-vector methods: each task vector added in full
        return [1.0 / n_models] * n_models if method == "linear" else [1.0] * n_models
    weights = [float(w) for w in weights]
    if len(weights) != n_models:
        raise MergeError(f"got {len(weights)} weights for {n_models} models")
    if any(w < 0 for w in weights) and not allow_negative_weights:
        raise MergeError(
            f"negative weights {weights}: refused (set allow_negative_weights for extrapolation or task negation)"
        )
    if method == "linear":
        total = sum(weights)
        if normalize and abs(total) < 1e-12:
            raise MergeError(f"weights {weights} sum to zero; cannot normalise")
        if not normalize and abs(total - 1.0) > 1e-6:
            raise MergeError(f"weights {weights} sum to {total:g}, not 1; fix them or set normalize")
        if normalize:
            weights = [w / total for w in weights]
    return weights


# ----------------------------------------------------------------------------------------------
# The merge itself


@dataclass
class MergeParams:
    method: str
    weights: list[float]
    t: float = 0.5
    eta: Optional[float] = None
    density: Optional[float] = None
    ema_rate: Optional[float] = None
    scale: float = 1.0
    seed: int = 0


def dare_generator(seed: int, name: str, index: int) -> torch.Generator:
    """The DARE drop mask's generator for one tensor of one model: independent of processing order."""
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def merge_tensor(p: MergeParams, name: str, tensors: list[torch.Tensor], base: Optional[torch.Tensor]) -> torch.Tensor:
    """One output tensor from the inputs' tensors (already float32/float64); posttrain.algos does the math."""
    m = p.method
    if m == "linear":
        return algos.linear(tensors, p.weights, normalize=False, allow_negative=True)
    if m == "ema":
        ema = tensors[0]
        for new in tensors[1:]:
            ema = algos.ema_update(ema, new, p.ema_rate)
        return ema
    if m == "slerp":
        return algos.slerp(tensors[0], tensors[1], p.t)
    if m == "liti":  # one model: LITI towards base; two: WARP, SLERP of task vectors then LITI
        merged = tensors[0] if len(tensors) == 1 else algos.slerp_task_vectors(base, tensors[0], tensors[1], p.t)
        return algos.liti(base, merged, p.eta)
    taus = [algos.task_vector(x, base) for x in tensors]
    if m == "task_arithmetic":
        return algos.task_arithmetic(base, taus, p.weights)
    if m == "ties":
        return algos.ties(base, taus, p.weights, p.density, scale=p.scale)
    dropped = [algos.dare(tau, p.density, dare_generator(p.seed, name, i)) for i, tau in enumerate(taus)]
    return algos.task_arithmetic(base, dropped, p.weights)


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def stream_merge(
    p: MergeParams,
    models: list[ModelSource],
    base: Optional[ModelSource],
    out: Path,
    out_dtype: Optional[torch.dtype],
    max_shard_bytes: int,
) -> dict:
    """Write the merged safetensors (and index when sharded) into `out`; return byte counts."""
    ref = base or models[0]
    plan = []
    for name, (st_dtype, shape) in ref.specs.items():
        floating = TORCH_DTYPES[st_dtype].is_floating_point
        plan.append((name, ST_DTYPES[out_dtype] if (out_dtype and floating) else st_dtype, shape))
    shards = plan_shards(plan, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    bytes_read = 0
    for fname, specs in zip(names, shards):
        writer = ShardWriter(out / fname, specs)
        for name, st_dtype, _ in specs:
            tensors = [src.read(name) for src in models]
            base_t = base.read(name) if base else None
            bytes_read += sum(x.nbytes for x in tensors) + (base_t.nbytes if base_t is not None else 0)
            if not TORCH_DTYPES[st_dtype].is_floating_point:  # integer buffers: the reference's, unchanged
                merged = base_t if base_t is not None else tensors[0]
            else:
                merged = merge_tensor(p, name, [_work(x) for x in tensors], None if base_t is None else _work(base_t))
            writer.write(name, merged.to(TORCH_DTYPES[st_dtype]))
            del tensors, base_t, merged
    total = sum(nbytes(d, s) for _, d, s in plan)
    if len(shards) > 1:
        weight_map = {name: fname for fname, specs in zip(names, shards) for name, _, _ in specs}
        atomic_write_json(
            out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    return {"bytes_read": bytes_read, "bytes_written": total, "shards": len(shards)}


def mergekit_merge(
    p: MergeParams, models: list[Path], base: Optional[Path], out: Path, out_dtype: torch.dtype, max_shard_bytes: int
) -> None:
    """The same merge through mergekit's run_merge (weights only; side files are copied by the caller)."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    except ImportError as err:
        raise MergeError(
            f"backend mergekit: mergekit is not installed ({err}); pip install 'posttrain[merge]'"
        ) from None
    entries = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, p.weights)]
    cfg: dict = {"merge_method": p.method, "models": entries, "dtype": "float32"}
    if p.method == "linear":
        cfg["parameters"] = {"normalize": False}  # weights arrive already normalised
    elif p.method == "slerp":
        cfg.update(base_model=str(models[0]), models=[{"model": str(m)} for m in models], parameters={"t": p.t})
    else:
        cfg.update(base_model=str(base), parameters={"normalize": p.method == "ties", "lambda": p.scale})
        if p.method == "ties":
            for e in entries:
                e["parameters"]["density"] = p.density
    cfg["out_dtype"] = str(out_dtype).removeprefix("torch.")  # mergekit computes in float32, as we do
    options = MergeOptions(
        out_shard_size=max_shard_bytes,
        copy_tokenizer=False,
        write_model_card=False,
        quiet=True,
        random_seed=p.seed,
        trust_remote_code=False,
        safe_serialization=True,
    )
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options)
    (out / "config.json").unlink(missing_ok=True)  # ours (the reference model's) replaces it


def copy_side_files(ref: Path, out: Path, out_dtype: Optional[torch.dtype]) -> list[str]:
    """Config, tokenizer, chat template and generation config from the reference model dir."""
    copied = []
    for name in SIDE_FILES:
        if (ref / name).is_file():
            shutil.copy2(ref / name, out / name)
            copied.append(name)
    if out_dtype is not None:  # the config names the new dtype (torch_dtype too, if an old config has it)
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(
            {k: str(out_dtype).removeprefix("torch.") for k in ("dtype", "torch_dtype") if k in cfg or k == "dtype"}
        )
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return copied


def choose_backend(backend: str, method: str) -> str:
    """streaming | mergekit as asked; auto = mergekit if installed and equal to ours for `method`."""
    if backend not in ("streaming", "mergekit", "auto"):
        raise MergeError(f"unknown backend {backend!r}; expected streaming, mergekit or auto")
    if backend == "mergekit" and method not in MERGEKIT_METHODS:
        raise MergeError(
            f"backend mergekit cannot do {method} (it has {', '.join(sorted(MERGEKIT_METHODS))}); "
            f"use backend streaming or auto"
        )
    if backend == "auto":
        import importlib.util

        exact = method in MERGEKIT_EXACT and importlib.util.find_spec("mergekit") is not None
        return "mergekit" if exact else "streaming"
    return backend


def merge_models(
    method: str,
    inputs: Sequence[str | Path],
    out: str | Path,
    base: str | Path | None = None,
    weights: Optional[Sequence[float]] = None,
    t: Optional[float] = None,
    eta: Optional[float] = None,
    density: Optional[float] = None,
    seed: int = 0,
    ema_rate: Optional[float] = None,
    normalize: bool = True,
    scale: float = 1.0,
    allow_negative_weights: bool = False,
    dtype: str = "keep",
    max_shard_size: int | str = "2GB",
    allow_tokenizer_mismatch: bool = False,
    backend: str = "streaming",
) -> dict:
    """Merge model dirs into `out` (written atomically); return the recipe, also saved as merge_recipe.json.

    inputs: model dirs, LoRA adapter dirs, or folders of checkpoint-N dirs (expanded, oldest first).
    Methods: linear (weights), ema (ema_rate, inputs oldest first), slerp (2 models, t), task_arithmetic
    (base, weights), ties (base, density, weights, scale), dare (base, density, weights, seed),
    liti (base, eta; one model, or two whose task vectors are SLERPed with t first = WARP's merge).
    Raises MergeError, before writing anything, for every request it cannot honour exactly.
    """
    started = time.time()
    expanded = [(inp, expand_checkpoints(inp)) for inp in inputs]
    paths = [p for _, dirs in expanded for p in dirs]
    used = check_settings(
        method,
        len(paths),
        base is not None,
        weights,
        t,
        eta,
        density,
        ema_rate,
        scale,
        normalize,
        allow_negative_weights,
        folders=folder_note(expanded),
    )
    if dtype not in ("keep", "float32", "bfloat16", "float16"):
        raise MergeError(f"dtype {dtype!r}: expected keep, float32, bfloat16 or float16")
    out_dtype = None if dtype == "keep" else getattr(torch, dtype)
    params = MergeParams(
        method, used, t=0.5 if t is None else t, eta=eta, density=density, ema_rate=ema_rate, scale=scale, seed=seed
    )
    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as err:
        raise MergeError(str(err)) from None
    chosen, out = choose_backend(backend, method), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.adapters.") as tmp_root:
        described, sources = _open_inputs(paths + ([Path(base)] if base is not None else []), Path(tmp_root))
        base_src = sources.pop() if base is not None else None
        ref = base_src or sources[0]
        warnings = check_compatible([ref] + [s for s in sources if s is not ref], allow_tokenizer_mismatch)
        for w in warnings:
            log.warning("merge: %s", w)
        with atomic_dir(out) as tmp:
            if chosen == "mergekit":
                ref_dtype = TORCH_DTYPES[next(iter(ref.specs.values()))[0]]
                mergekit_merge(
                    params,
                    [s.path for s in sources],
                    base_src and base_src.path,
                    tmp,
                    out_dtype or ref_dtype,
                    max_bytes,
                )
                counts = _check_mergekit_output(tmp, ref, out_dtype)
                counts["bytes_read"] = sum(s.nbytes() for s in sources + ([base_src] if base_src else []))
            else:
                counts = stream_merge(params, sources, base_src, tmp, out_dtype, max_bytes)
            copied = copy_side_files(ref.path, tmp, out_dtype)
            seconds = time.time() - started
            recipe = {
                "method": method,
                "backend": chosen,
                "backend_requested": backend,
                "models": described[: len(paths)],
                "base": described[-1] if base is not None else None,
                "weights": used if method not in ("ema", "slerp", "liti") else None,
                "normalize": normalize if method == "linear" else None,
                "t": params.t if method == "slerp" or (method == "liti" and len(paths) == 2) else None,
                "eta": eta,
                "density": density,
                "ema_rate": ema_rate,
                "scale": scale if method == "ties" else None,
                "seed": seed if method == "dare" else None,
                "dtype": dtype,
                "output_dtypes": sorted({d for d, _ in ModelSource.open(tmp, need_config=False).specs.values()}),
                "tensors": len(ref.specs),
                "files_copied_from": str(ref.origin.resolve()),
                "files_copied": copied,
                "warnings": warnings,
                **counts,
                "seconds": round(seconds, 3),
                "input_gb_per_s": round(counts["bytes_read"] / 1e9 / max(seconds, 1e-9), 3),
            }
            atomic_write_json(tmp / "merge_recipe.json", recipe)
    return recipe


def _open_inputs(paths: list[Path], tmp_root: Path) -> tuple[list[dict], list[ModelSource]]:
    """Index every input (adapters merged into their base first); describe each for the recipe."""
    described, sources = [], []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise MergeError(f"model directory not found: {p}")
        entry = {"path": str(p.resolve()), "hash": hash_path(p), "kind": "model"}
        if (p / "adapter_config.json").is_file():
            adapter_base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
            entry.update(
                kind="lora_adapter (merged into its base first)",
                adapter_base=adapter_base,
                adapter_base_hash=(hash_path(adapter_base) if adapter_base and Path(adapter_base).is_dir() else None),
            )
            sources.append(ModelSource.open(materialize_adapter(p, tmp_root), origin=p))
        else:
            sources.append(ModelSource.open(p))
        described.append(entry)
    return described, sources


def _check_mergekit_output(out: Path, ref: ModelSource, out_dtype: Optional[torch.dtype]) -> dict:
    """mergekit must have written exactly the reference's tensors, shapes and dtypes: never something else."""
    got = ModelSource.open(out, need_config=False)
    for name, (st_dtype, shape) in ref.specs.items():
        want = ST_DTYPES[out_dtype] if out_dtype and TORCH_DTYPES[st_dtype].is_floating_point else st_dtype
        if got.specs.get(name) != (want, shape):
            raise MergeError(
                f"mergekit output differs from the inputs at {name}: {got.specs.get(name)} vs {(want, shape)}"
            )
    if set(got.specs) != set(ref.specs):
        raise MergeError(f"mergekit wrote extra tensors {sorted(set(got.specs) - set(ref.specs))[:5]}")
    return {"bytes_written": got.nbytes(), "shards": len(set(got.files.values()))}
