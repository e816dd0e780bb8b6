"""Optimisation in this process's place in a launch: our loops' trainable handles, and the settings
the Trainer-based stages give transformers and DeepSpeed.

Our own loops (ppo) call `handle.step(loss)` and never need to know whether the model is sharded. The
Trainer stages (sft, rm, distill, dpo) get their device, precision and DeepSpeed config from
`trainer_kwargs`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..config import DistributedConfig
from .rank import bind_device, world


def deepspeed_config(dcfg: DistributedConfig, precision: str = "fp32", for_trainer: bool = True) -> dict:
    """A DeepSpeed config. For the HF Trainer 'auto' values are filled from the TrainingArguments (bf16 and
    fp16 included); for our own loops every value is explicit."""
    pin = torch.cuda.is_available()
    zero: dict = {"stage": dcfg.zero_stage}
    if dcfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if dcfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = dcfg.gather_16bit_weights_on_save
        if dcfg.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if for_trainer:
        return {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "zero_optimization": zero,
        }
    return {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
    }


def trainer_kwargs(dcfg: DistributedConfig, device: torch.device, precision: str) -> dict:
    """TrainingArguments keyword arguments for this process's place in the launch, device and precision.

    One process: the plain Trainer on `device` (CPU unless it is a GPU). Several: DeepSpeed ZeRO (or DDP
    for zero_stage 0) over the process group `init_process_state` created (gloo on CPU, NCCL on GPUs).
    bf16/fp16 are mixed precision: fp32 master weights, forward passes under autocast.
    """
    _, world_size = world()
    cpu = device.type == "cpu"
    kwargs: dict = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    if world_size == 1:
        return {**kwargs, "use_cpu": cpu}
    kwargs["accelerator_config"] = {"use_configured_state": True}
    if dcfg.zero_stage > 0:
        kwargs["deepspeed"] = deepspeed_config(dcfg, precision)
    else:
        kwargs.update(use_cpu=cpu, ddp_backend="gloo" if cpu else "nccl")
    return kwargs


def end_sharded_init() -> None:
    """After a ZeRO-3 training run, let this process load models whole again.

    Once TrainingArguments carry a ZeRO-3 config, transformers builds every later `from_pretrained`
    inside `deepspeed.zero.Init`, which is collective: one rank loading a model alone (say, to evaluate
    the saved output) would wait forever for the others.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def init_process_state(dcfg, device: torch.device) -> None:
    """Bind this rank to its device and create accelerate's shared state before any Trainer does.

    Left to itself, accelerate on CPU counts one process and DeepSpeed's batch-size check fails;
    configuring the state first (and telling the Trainer to use it) makes all ranks one job. Without
    DeepSpeed on CPU the state must be told `cpu`: otherwise it counts the ranks but is not distributed,
    and each rank's Trainer trains alone on its share of the data (no DDP, no gradient all-reduce).
    """
    from accelerate import PartialState

    bind_device(device)
    deepspeed = getattr(dcfg, "zero_stage", 0) > 0  # generating stages (ProcessesConfig) use no DeepSpeed
    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(cpu=device.type == "cpu" and not deepspeed, backend="nccl" if device.type == "cuda" else "gloo")


class LocalTrainable:
    """One process: the model itself, AdamW, global-norm gradient clipping; a loss scaler for fp16."""

    distributed = False

    def __init__(self, model, lr: float, max_grad_norm: float, precision: str = "fp32"):
        self.module, self.max_grad_norm = model, max_grad_norm
        # fused: one kernel per step instead of one per tensor (measured ~3.6x cheaper per step on CPU)
        self.optimizer = torch.optim.AdamW(_trained(model), lr=lr, fused=True)
        device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        # Freed now, not before the next backward: no parameter-sized gradient is held through the next
        # rollout's generation, scoring and forward pass.
        self.optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self) -> dict:
        return self.module.state_dict()

    def extra_state(self) -> dict:
        """JSON-able state beside the optimizer's (the fp16 loss scale), for resume checkpoints."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedTrainable:
    """A DeepSpeed ZeRO engine around the model (one per rank); optimizer states (and, for ZeRO-3,
    parameters) are sharded across ranks, and DeepSpeed keeps the fp32 master copy for bf16/fp16.
    Checkpoints use DeepSpeed's own sharded format."""

    distributed = True

    def __init__(
        self, model, lr: float, max_grad_norm: float, dcfg: DistributedConfig, micro_batch: int, precision: str = "fp32"
    ):
        import deepspeed

        config = {
            **deepspeed_config(dcfg, precision, for_trainer=False),
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": max_grad_norm,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
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


def trainable(
    model, lr: float, max_grad_norm: float, dcfg: DistributedConfig, micro_batch: int, precision: str = "fp32"
):
    """The optimisation handle for this process's place in the launch."""
    if world()[1] == 1:
        return LocalTrainable(model, lr, max_grad_norm, precision)
    return DeepSpeedTrainable(model, lr, max_grad_norm, dcfg, micro_batch, precision)


def forward_through(model, fn, *args):
    """`fn(module, *args)` for a model a Trainer hands to its loss, run as the forward of the model's
    wrapper (DDP, a DeepSpeed engine) when it has one.

    Lean scoring calls the body and the output head directly instead of the model's forward, so that no
    full-vocabulary logits exist. Called on a wrapper's inner module it would skip what the wrapper's
    forward sets up for the backward pass: DDP's gradient all-reduce, DeepSpeed's backward prologue
    (accumulation scaling, the ZeRO optimiser's bookkeeping) and ZeRO-3's fetch hooks on the root module.
    So `fn` stands in for the inner module's forward for one call of the wrapper.
    """
    inner = _wrapped_module(model)
    if inner is None:
        return fn(model, *args)
    own = inner.__dict__.get("forward")  # a forward patched onto the instance (TRL's fused head) stays
    inner.forward = lambda: fn(inner, *args)  # an instance attribute shadows the class's forward
    try:
        return model()
    finally:
        if own is None:
            del inner.forward
        else:
            inner.forward = own


def _wrapped_module(model):
    """The module inside a DDP or DeepSpeed wrapper, else None."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    deepspeed = sys.modules.get("deepspeed")  # loaded by whoever built an engine; never imported here
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module
    return None
