"""The launcher seam: the only module that knows about processes, torchrun and DeepSpeed.

A training stage runs in the calling process, or, when its `distributed.num_processes` > 1, as that
many ranks started by torchrun (`python -m posttrain.launch SPEC`), each running the same stage
lifecycle; rank 0 writes the outputs. Multi-node users start the same module with their own torchrun
line (`torchrun --nnodes ... -m posttrain.launch run_dir/<stage>/launch.json`).

On CPU the ranks talk over gloo. Trainer-based stages get their DeepSpeed config from
`trainer_kwargs`, built from the stage's DistributedConfig.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from .config import DistributedConfig
from .manifest import atomic_write_json

log = logging.getLogger("posttrain")


def deepspeed_config(dcfg: DistributedConfig) -> dict:
    """A DeepSpeed config for the HF Trainer ('auto' values are filled from the TrainingArguments)."""
    zero: dict = {"stage": dcfg.zero_stage}
    if dcfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dcfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = dcfg.gather_16bit_weights_on_save
        if dcfg.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def world() -> tuple[int, int]:
    """(rank, world size) of this process, from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def trainer_kwargs(dcfg: DistributedConfig) -> dict:
    """TrainingArguments keyword arguments for this process's place in the launch.

    One process: plain Trainer on GPU if present, else CPU. Several: DeepSpeed ZeRO (or DDP for
    zero_stage 0) over the process group that `_init_process_state` created (gloo on CPU).
    """
    _, world_size = world()
    cpu = not torch.cuda.is_available()
    if world_size == 1:
        return {"use_cpu": cpu}
    kwargs: dict = {"accelerator_config": {"use_configured_state": True}}
    if dcfg.zero_stage > 0:
        kwargs["deepspeed"] = deepspeed_config(dcfg)
    else:
        kwargs["use_cpu"] = cpu
        kwargs["ddp_backend"] = "gloo" if cpu else "nccl"
    return kwargs


def end_sharded_init() -> None:
    """After a ZeRO-3 training run, let this process load models whole again.

    Once TrainingArguments carry a ZeRO-3 config, transformers builds every later `from_pretrained`
    inside `deepspeed.zero.Init`, which is collective: one rank loading a model alone (say, to evaluate
    the saved output) would wait forever for the others.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _init_process_state(dcfg: DistributedConfig) -> None:
    """Create accelerate's shared state before any Trainer does, with the right backend.

    Left to itself, accelerate on CPU counts one process and DeepSpeed's batch-size check fails;
    configuring the state first (and telling the Trainer to use it) makes all ranks one job.
    """
    from accelerate import PartialState

    if dcfg.zero_stage > 0:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo" if not torch.cuda.is_available() else "nccl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(stage, scfg, run_dir: Path) -> dict:
    """Run `stage` in `scfg.distributed.num_processes` local ranks; return rank 0's metrics."""
    ctx, n = stage.ctx, scfg.distributed.num_processes
    spec_path = ctx.dir / "launch.json"
    result_path = ctx.dir / "result.json"
    result_path.unlink(missing_ok=True)
    atomic_write_json(spec_path, {"stage": stage.name, "config": scfg.model_dump(mode="json"), "inputs": ctx.inputs,
                                  "seed": ctx.seed, "dir": str(ctx.dir), "pipeline": str(run_dir / "config.yaml")})
    threads = (ctx.pipeline.threads if ctx.pipeline is not None and ctx.pipeline.threads else 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "POSTTRAIN_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "posttrain.launch", str(spec_path)]
    log.info("[%s] launching %d processes (ZeRO-%d): %s", stage.name, n, scfg.distributed.zero_stage, " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage.name!r}: distributed run exited with code {proc.returncode} "
                           f"(see the log above; spec in {spec_path})")
    return json.loads(result_path.read_text())


def worker_main(spec_path: str) -> None:
    """Entry point of each rank: rebuild the stage from the spec and run its lifecycle."""
    from .pipeline import load_pipeline
    from .stages import StageContext, stage_class

    spec = json.loads(Path(spec_path).read_text())
    if os.environ.get("POSTTRAIN_THREADS"):
        torch.set_num_threads(int(os.environ["POSTTRAIN_THREADS"]))
    rank, world_size = world()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    stage_cls = stage_class(spec["stage"])
    cfg = stage_cls.Config.model_validate(spec["config"])
    _init_process_state(cfg.distributed)
    ctx = StageContext(name=spec["stage"], dir=Path(spec["dir"]), inputs=spec["inputs"], seed=spec["seed"],
                       pipeline=load_pipeline(spec["pipeline"]), rank=rank, world_size=world_size)
    metrics = stage_cls(cfg, ctx).run()
    if rank == 0:
        atomic_write_json(Path(spec["dir"]) / "result.json", metrics)
    if torch.distributed.is_initialized():
        # Shut the process group down before exit: gloo's threads left to the interpreter's teardown
        # occasionally abort a rank ("terminate called without an active exception") after the work is done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker_main(sys.argv[1])


# ----------------------------------------------------------------------------------------------
# Optimisation handles for our own training loops (PPO): the loop calls `handle.step(loss)` and
# never needs to know whether the model is sharded.


class LocalTrainable:
    """One process: the model itself, AdamW, global-norm gradient clipping."""

    distributed = False

    def __init__(self, model, lr: float, max_grad_norm: float):
        self.module, self.max_grad_norm = model, max_grad_norm
        # fused: one kernel per step instead of one per tensor (measured ~3.6x cheaper per step on CPU)
        self.optimizer = torch.optim.AdamW(_trained(model), lr=lr, fused=True)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()

    def full_state_dict(self) -> dict:
        return self.module.state_dict()


class DeepSpeedTrainable:
    """A DeepSpeed ZeRO engine around the model (one per rank); optimizer states (and, for ZeRO-3,
    parameters) are sharded across ranks. Checkpoints use DeepSpeed's own sharded format."""

    distributed = True

    def __init__(self, model, lr: float, max_grad_norm: float, dcfg: DistributedConfig, micro_batch: int):
        import deepspeed

        zero = deepspeed_config(dcfg)["zero_optimization"]
        config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                  "gradient_clipping": max_grad_norm, "zero_optimization": zero,
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        optimizer = torch.optim.AdamW(_trained(model), lr=lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.engine.module  # ZeRO-3 hooks live on its submodules: call them directly
        self.zero_stage = dcfg.zero_stage

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def full_state_dict(self) -> dict:
        """Full (unsharded) weights on every rank; collective under ZeRO-3: all ranks must call it."""
        if self.zero_stage != 3:
            return self.module.state_dict()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def save_checkpoint(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="state")

    def load_checkpoint(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag="state")


def _trained(model) -> list:
    """The parameters the optimiser owns: with LoRA only the adapters (and a full-trained head)."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable(model, lr: float, max_grad_norm: float, dcfg: DistributedConfig, micro_batch: int):
    """The optimisation handle for this process's place in the launch."""
    _, world_size = world()
    if world_size == 1:
        return LocalTrainable(model, lr, max_grad_norm)
    return DeepSpeedTrainable(model, lr, max_grad_norm, dcfg, micro_batch)


def all_ranks_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar statistics over ranks (identity in one process)."""
    _, world_size = world()
    if world_size == 1 or not torch.distributed.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, (t / world_size).tolist()))


def all_ranks_masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of `x` where `mask` is 1, over every rank's tensors (all ranks call it)."""
    mask = mask.to(x.dtype)
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if world()[1] > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    n = sums[2].clamp(min=1.0)
    mean = sums[0] / n
    var = (sums[1] / n - mean ** 2).clamp(min=0.0) * n / (n - 1).clamp(min=1.0)
    return mean.to(x.dtype), var.to(x.dtype)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
