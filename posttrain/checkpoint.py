"""Resume checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory written to a temp path and renamed, so the newest complete one is always
loadable; older ones are pruned after a new one lands.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .manifest import atomic_dir
from .paths import check_safetensors_file


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
    numpy_state = {
        "kind": kind,
        "keys": keys.tolist(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
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


def save_checkpoint(
    folder: Path,
    step: int,
    models: dict,
    optimizers: dict,
    meta: dict,
    keep: int = 2,
    extra_dir: Optional[Path] = None,
    tensors: Optional[dict[str, dict]] = None,
) -> Path:
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


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint directory `path` cannot be resumed from (a state file that does not parse, a
    safetensors or torch.save file cut short), or None when it looks whole. Reads headers only."""
    for state in ("state.json", "trainer_state.json"):
        if (path / state).is_file():
            try:
                json.loads((path / state).read_text())
            except ValueError as err:
                return f"{state} does not parse ({err})"
    for file in sorted(path.rglob("*.safetensors")):
        try:
            check_safetensors_file(file)
        except ValueError as err:
            return str(err)
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.stat().st_size == 0:
            return f"{file.relative_to(path)} is empty"
        if file.suffix in TORCH_SAVE_SUFFIXES and not _whole_zip(file):
            return f"{file.relative_to(path)} is cut short (its zip directory is missing or unreadable)"
    return None


TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin")
"""Files of torch.save (the Trainer's optimizer.pt, scheduler.pt, rng_state*.pth; DeepSpeed's states)."""


def _whole_zip(file: Path) -> bool:
    """Whether a torch.save file (a zip archive since torch 1.6) has its central directory, which is
    written last: a file cut short lacks it. Files of the older, non-zip format are not judged."""
    import zipfile

    with open(file, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return True
    size = file.stat().st_size
    try:
        with zipfile.ZipFile(file) as archive:
            return all(info.header_offset + info.compress_size <= size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return False


def newest_whole(candidates: list[Path], log=None) -> Optional[Path]:
    """The newest of `candidates` (ordered oldest first) that is whole; a broken one is skipped with a
    warning naming it and why, and the one before it is used."""
    for path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        (log or logging.getLogger("posttrain")).warning(
            "checkpoint %s is damaged and is skipped: %s; resuming from the one before it", path, problem
        )
    return None


def latest_checkpoint(folder: Path, log=None) -> Optional[Path]:
    """The newest whole step-N checkpoint of our own loops (state.json marks it complete)."""
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file()) if folder.is_dir() else []
    return newest_whole(done, log)


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


def last_trainer_checkpoint(folder: Path, log=None) -> Optional[str]:
    """The newest whole HF Trainer checkpoint-N directory (one with trainer_state.json), if any."""
    if not folder.is_dir():
        return None
    done = sorted(
        (p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    found = newest_whole(done, log)
    return str(found) if found else None


LOSS_FILE = "posttrain_loss.json"
"""Written into each Trainer checkpoint: the sum of per-step training losses up to it, so that a resumed
run reports the same mean training loss as an uninterrupted one (transformers averages only the steps it
ran itself)."""


class TrainingGuard:
    """A Trainer callback that stops on a non-finite loss, naming the step, before a checkpoint of the
    broken weights can be written; and that records the running loss sum in every checkpoint."""

    def __init__(self, trainer, stage: str, loss_offset: float = 0.0, resumed_step: int = 0):
        self.trainer, self.stage, self.loss_offset, self.resumed_step = trainer, stage, loss_offset, resumed_step

    def whole_run_loss(self, mean_since_resume: float, steps: int) -> float:
        """The mean training loss over all `steps`, from transformers' mean over the steps after the resume."""
        if not self.resumed_step:
            return mean_since_resume
        return (self.loss_offset + mean_since_resume * (steps - self.resumed_step)) / max(steps, 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The end-of-training `train_loss` of a resumed run, as an uninterrupted run logs it: in the log
        history (metrics.json, curves) and, since this callback runs first, in every tracker."""
        if self.resumed_step and logs and "train_loss" in logs:
            logs["train_loss"] = self.whole_run_loss(logs["train_loss"], state.global_step)
            if state.log_history and "train_loss" in state.log_history[-1]:
                state.log_history[-1]["train_loss"] = logs["train_loss"]
        return control

    def loss_sum(self) -> float:
        """Sum over all steps so far of the per-step training loss (mean over ranks), this run and before."""
        from transformers.trainer_pt_utils import nested_gather

        t = self.trainer
        pending = (
            nested_gather(t._tr_loss.detach(), t.args.parallel_mode).mean().item() if hasattr(t, "_tr_loss") else 0.0
        )
        return self.loss_offset + t._total_loss_scalar + pending

    def on_step_end(self, args, state, control, **kwargs):
        loss = getattr(self.trainer, "_tr_loss", None)
        if loss is not None and not torch.isfinite(loss).all():
            last = last_trainer_checkpoint(Path(args.output_dir))
            raise FloatingPointError(
                f"{self.stage}: the training loss is {loss.item()} at step {state.global_step}; stopped before "
                f"saving anything from this step "
                f"({'the last good checkpoint is ' + last if last else 'no checkpoint yet'}). "
                f"Lower {self.stage}.learning_rate, check the data, or use fp32"
            )
        return control

    def on_save(self, args, state, control, **kwargs):
        total = self.loss_sum()  # every rank: the gather is collective
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            saved = {"step": state.global_step, "loss_sum": total}
            if hasattr(self.trainer, "_total_train_tokens"):  # TRL's num_tokens counter, which it does not save
                saved["num_tokens"] = self.trainer._total_train_tokens
            (folder / LOSS_FILE).write_text(json.dumps(saved))
        return control

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda args, state, control, **kwargs: control
        raise AttributeError(name)


def _logged_loss_sum(trainer_state: Path, up_to_step: int) -> float:
    """A checkpoint written without LOSS_FILE: the loss sum from its logged window means (exact when every
    step up to the checkpoint was inside a logged window)."""
    history = json.loads(trainer_state.read_text()).get("log_history", [])
    total, prev = 0.0, 0
    for entry in history:
        if "loss" in entry and entry.get("step", 0) <= up_to_step:
            total += entry["loss"] * (entry["step"] - prev)
            prev = entry["step"]
    return total


def train_from_last_checkpoint(trainer, folder: Path, log, stage: str) -> dict:
    """Run an HF/TRL Trainer, resuming from its newest whole checkpoint in `folder` if there is one; stop on
    a non-finite loss. Return the metrics every trainer stage reports (loss, steps, processes, ZeRO stage,
    resume point); a resumed run reports the uninterrupted run's mean training loss."""
    metrics = {}
    resume = last_trainer_checkpoint(folder, log)
    offset, resumed_step = 0.0, 0
    if resume:
        log.info("[%s] resuming from %s", stage, resume)
        resumed_step = metrics["resumed_from_step"] = int(Path(resume).name.split("-")[1])
        saved = Path(resume) / LOSS_FILE
        record = json.loads(saved.read_text()) if saved.is_file() else {}
        offset = (
            record["loss_sum"]
            if "loss_sum" in record
            else _logged_loss_sum(Path(resume) / "trainer_state.json", resumed_step)
        )
        if "num_tokens" in record and hasattr(trainer, "_total_train_tokens"):  # logged num_tokens go on counting
            trainer._total_train_tokens = record["num_tokens"]
    if resume:  # the first evaluation is in the restored log history already: not again at the resume step
        trainer.args.eval_on_start = False
    guard = TrainingGuard(trainer, stage, offset, resumed_step)
    trainer.callback_handler.callbacks.insert(0, guard)  # before the trackers: they log what on_log corrects
    result = trainer.train(resume_from_checkpoint=resume)
    acc = trainer.accelerator
    zero = acc.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    steps = trainer.state.global_step
    loss = guard.whole_run_loss(result.training_loss, steps)
    metrics.update(train_loss=round(loss, 4), steps=steps, processes=acc.num_processes, deepspeed_zero_stage=zero)
    return metrics
