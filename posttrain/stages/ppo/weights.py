"""Keeping what samples and anchors the RL stage in step with the trained policy: the rollout engine's
weights, the plain rollout copy, and WARP's EMA anchor with the reference it feeds."""

from __future__ import annotations

import torch

from ...algos.merge import ema_update
from ...lora import merged_state_dict


def served_weights(policy_handle, lora_scalings: dict) -> dict:
    """The policy's full weights as the engine serves them (ZeRO-3: gathered, all ranks call this; LoRA:
    adapters folded in)."""
    full = policy_handle.full_state_dict()
    return merged_state_dict(full, lora_scalings) if lora_scalings else full


def push_weights(engine, rollout_model, policy, full: dict) -> None:
    """`full` into an engine that holds its own copy (vLLM) and into the plain rollout copy evaluation and
    save() use, where that is not the policy itself."""
    if hasattr(engine, "load_weights"):
        engine.load_weights(full.items())
    if rollout_model is not None and rollout_model is not policy:
        rollout_model.load_state_dict(full)


@torch.no_grad()
def move_anchor(anchor: dict, full: dict, ema_rate: float, reference) -> float:
    """WARP's EMA step, accumulated in fp32 (in bf16 a step of mu = 0.01 times a small difference rounds
    away and the anchor never moves), then copied into the reference; returns the L2 norm of the step."""
    squared = 0.0
    for name, tensor in anchor.items():
        moved = ema_update(tensor, full[name], ema_rate)
        squared += float((moved - tensor).pow(2).sum())
        tensor.copy_(moved)
    reference.load_state(anchor)
    return squared**0.5
