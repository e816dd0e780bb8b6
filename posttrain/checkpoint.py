"""Resume checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory written to a temp path and renamed, so the newest complete one is always
loadable; older ones are pruned after a new one lands.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .manifest import atomic_dir


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state into (tensors, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Python's, NumPy's, torch's CPU and every CUDA device's generator states (tensors, JSON)."""
    import numpy as np

    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_rng_{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                   "gauss": float(gauss)}
    return tensors, {"python_rng": _jsonable(random.getstate()), "numpy_rng": numpy_state}


def restore_rng(tensors: dict, meta: dict) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch_rng"])
    cuda = [tensors[f"cuda_rng_{i}"] for i in range(len(tensors)) if f"cuda_rng_{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy_rng" in meta:
        n = meta["numpy_rng"]
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _jsonable(state):
    return [state[0], list(state[1]), state[2]]


def save_checkpoint(folder: Path, step: int, models: dict, optimizers: dict, meta: dict, keep: int = 1,
                    extra_dir: Optional[Path] = None, tensors: Optional[dict[str, dict]] = None) -> Path:
    """Write folder/step-N atomically: each model's and optimizer's tensors, named tensor sets (e.g. an
    fp32 EMA anchor), RNG, and `meta` JSON.

    `extra_dir` (e.g. DeepSpeed's sharded engine states) is moved inside before the final rename.
    """
    final = folder / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        if extra_dir is not None:
            for item in Path(extra_dir).iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(extra_dir, ignore_errors=True)
        for name, model in models.items():
            save_model(model, str(tmp / f"{name}.safetensors"))  # handles tied (shared) weights
        for name, named in (tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, tmp / f"{name}.safetensors")
        all_meta = {"step": step, **meta, "optimizers": {}}
        for name, opt in optimizers.items():
            tensors, opt_meta = optimizer_tensors(opt)
            save_file(tensors, tmp / f"optim_{name}.safetensors")
            all_meta["optimizers"][name] = opt_meta
        rng_t, rng_m = rng_state()
        save_file(rng_t, tmp / "rng.safetensors")
        all_meta.update(rng_m)
        (tmp / "state.json").write_text(json.dumps(all_meta))
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Optional[Path]:
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, models: dict, optimizers: dict, tensors: Optional[dict[str, dict]] = None) -> dict:
    """Restore models, optimizers, tensor sets (copied into the given tensors) and RNG in place; return
    the JSON state (step, data position, ...)."""
    meta = json.loads((path / "state.json").read_text())
    for name, model in models.items():
        load_model(model, str(path / f"{name}.safetensors"))
    for name, named in (tensors or {}).items():
        for key, value in load_file(path / f"{name}.safetensors").items():
            named[key].copy_(value)
    for name, opt in optimizers.items():
        load_optimizer(opt, load_file(path / f"optim_{name}.safetensors"), meta["optimizers"][name])
    restore_rng(load_file(path / "rng.safetensors"), meta)
    return meta


def last_trainer_checkpoint(folder: Path) -> Optional[str]:
    """The newest complete HF Trainer checkpoint-N directory (one with trainer_state.json), if any."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[1]))) if done else None


def train_from_last_checkpoint(trainer, folder: Path, log, stage: str) -> dict:
    """Run an HF/TRL Trainer, resuming from its newest complete checkpoint in `folder` if there is one;
    return the metrics every trainer stage reports (loss, steps, processes, ZeRO stage, resume point)."""
    metrics = {}
    resume = last_trainer_checkpoint(folder)
    if resume:
        log.info("[%s] resuming from %s", stage, resume)
        metrics["resumed_from_step"] = int(Path(resume).name.split("-")[1])
    result = trainer.train(resume_from_checkpoint=resume)
    acc = trainer.accelerator
    zero = acc.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    metrics.update(train_loss=round(result.training_loss, 4), steps=trainer.state.global_step,
                   processes=acc.num_processes, deepspeed_zero_stage=zero)
    return metrics
