"""LoRA adapters on models our own loops train (PPO policy and value), and their merged weights.

The rollout engine (vLLM, or a plain HF copy) serves full weights, so after every update the adapters
are folded into a state dict with the base model's own parameter names and pushed. The fold is computed
from the (gathered) state dict, never by merging in place, so the trained adapter is not perturbed by
merge/unmerge round-off and ZeRO-3 shards need no special handling beyond the gather.
"""

from __future__ import annotations

import torch

from .algos.merge import lora_merge
from .config import LoraSection

ADAPTER = "default"


def add_adapters(model, section: LoraSection, task_type: str):
    """`model` wrapped with fresh LoRA adapters (peft); only the adapters (and a SEQ_CLS head) train."""
    from peft import get_peft_model

    return get_peft_model(model, section.peft_config(task_type))


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrap(model):
    """The transformers model inside a peft wrapper (adapters stay injected), else `model` itself."""
    return model.get_base_model() if is_peft(model) else model


def lora_scalings(model) -> dict[str, float]:
    """Module name (as in the peft model's state dict) -> alpha / r of every adapted layer."""
    from peft.tuners.lora import LoraLayer

    return {name: m.scaling[ADAPTER] for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A peft model's full state dict -> the plain model's state dict with every adapter folded in.

    Keys lose peft's `base_model.model.` prefix and `.base_layer`; `lora_A/lora_B` tensors are folded
    into their layer's weight; a SEQ_CLS head saved in full (`modules_to_save`) replaces the original.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        name = key.removeprefix("base_model.model.")
        if f".modules_to_save.{ADAPTER}." in name:
            name = name.replace(f".modules_to_save.{ADAPTER}.", ".")
        elif ".base_layer." in key:
            module = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            if name.endswith(".weight") and module in scalings:
                tensor = lora_merge(
                    tensor,
                    state[f"{module}.lora_A.{ADAPTER}.weight"],
                    state[f"{module}.lora_B.{ADAPTER}.weight"],
                    scalings[module],
                )
        out[name] = tensor
    return out
