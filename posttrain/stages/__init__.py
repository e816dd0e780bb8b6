"""Stage registry. Modules are imported on first use so `posttrain --help` stays fast."""

from __future__ import annotations

import importlib

from .base import Stage, StageContext

STAGE_MODULES = {
    "synth": "posttrain.stages.synth",
    "filter": "posttrain.stages.filter",
    "base": "posttrain.stages.base_model",
    "sft": "posttrain.stages.sft",
    "prefs": "posttrain.stages.prefs",
    "rm": "posttrain.stages.rm",
    "dpo": "posttrain.stages.dpo",
    "distill": "posttrain.stages.distill",
    "ppo": "posttrain.stages.ppo",
    "warp": "posttrain.stages.warp",
    "merge": "posttrain.stages.merge",
    "eval": "posttrain.stages.eval",
    "release": "posttrain.stages.release",
}
"""Stage kind -> module defining `STAGE` (a Stage subclass). Later stages register here."""


def stage_class(name: str) -> type[Stage]:
    if name not in STAGE_MODULES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name]).STAGE


__all__ = ["STAGE_MODULES", "Stage", "StageContext", "stage_class"]
