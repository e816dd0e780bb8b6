"""The pipeline config and its runner: stages in order, artifacts handed on by path, done work skipped.

A stage's fingerprint hashes its config, the seed, the fingerprints of its inputs and the fingerprint
of the stage before it. A stage whose manifest is complete with the same fingerprint is skipped; one
whose config or inputs changed re-runs, and so does everything after it. A stage that crashed
(manifest still 'running') re-runs with its directory kept, so it can resume from its checkpoints.
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from pydantic import Field, create_model, field_validator

from .config import ConfigError, Section, dump_config, load_config
from .manifest import atomic_write_text, hash_json, hash_path, is_complete, read_manifest, write_manifest
from .stages import STAGE_MODULES, StageContext, stage_class

log = logging.getLogger("posttrain")


class PipelineBase(Section):
    """Top-level keys shared by every pipeline config; each stage adds a section named after it."""

    run_dir: str = "runs/default"
    """Directory for everything the run writes (one subdirectory per stage)."""
    seed: int = 0
    """Seed for data generation, model initialisation and training."""
    threads: Optional[int] = Field(None, ge=1)
    """torch CPU threads per process (None: torch's default)."""
    stages: list[str]
    """Stages to run, in order (e.g. [synth, base, sft])."""

    @field_validator("stages")
    @classmethod
    def _known_unique(cls, names: list[str]) -> list[str]:
        for n in names:
            if n not in STAGE_MODULES:
                raise ValueError(f"unknown stage {n!r}; known stages: {', '.join(STAGE_MODULES)}")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stage(s) listed twice: {sorted(dup)}")
        return names


@functools.cache
def pipeline_model() -> type[PipelineBase]:
    """PipelineBase plus one optional section per registered stage (its defaults apply when absent)."""
    fields = {}
    for name in STAGE_MODULES:
        cfg_cls = stage_class(name).Config
        fields[name] = (cfg_cls, Field(default_factory=cfg_cls, description=f"Settings of the {name} stage."))
    return create_model("PipelineConfig", __base__=PipelineBase, **fields)


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineBase:
    return load_config(pipeline_model(), path, overrides)


class MissingInput(ConfigError):
    """A stage input that no earlier stage produced and the config does not name."""


def _resolve_inputs(name: str, stage_cls, cfg, artifacts: dict, fps: dict) -> tuple[dict, dict]:
    """Input name -> path and -> fingerprint: an explicit config path wins over earlier artifacts."""
    inputs, input_fps = {}, {}
    for inp, key in stage_cls.consumes.items():
        explicit = getattr(cfg, inp, None)
        if explicit and str(explicit) in artifacts and not Path(str(explicit)).exists():
            inputs[inp], input_fps[inp] = artifacts[str(explicit)], fps[str(explicit)]  # a "stage.kind" reference
        elif explicit:
            inputs[inp], input_fps[inp] = str(explicit), hash_path(explicit)
        elif key in artifacts:
            inputs[inp], input_fps[inp] = artifacts[key], fps[key]
        elif inp not in stage_cls.optional_inputs:
            raise MissingInput(f"stage {name!r} needs input {inp!r}: set {name}.{inp} to a path, or run a stage "
                               f"that produces {key!r} before it")
    return inputs, input_fps


def _referenced_files(tree) -> dict[str, str]:
    """Fingerprints of the files and directories a stage config names (recipes, reward files, hooks, models).

    Editing such a file must re-run the stage even though the config text did not change.
    """
    found: dict[str, str] = {}
    if isinstance(tree, dict):
        for value in tree.values():
            found.update(_referenced_files(value))
    elif isinstance(tree, list):
        for value in tree:
            found.update(_referenced_files(value))
    elif isinstance(tree, str) and 0 < len(tree) < 4096:
        path = tree.split(":", 1)[0] if ".py:" in tree else tree  # "hook.py:function" names a file
        if Path(path).exists():
            found[path] = hash_path(path)
    return found


def run_pipeline(cfg: PipelineBase, only: Optional[str] = None, force: bool = False) -> dict[str, dict]:
    """Run the configured stages (or just `only`, with earlier stages' finished artifacts as inputs)."""
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    names = list(cfg.stages) + ([only] if only and only not in cfg.stages else [])
    artifacts, fps, summary = {}, {}, {}
    prev = hash_json({"seed": cfg.seed})
    for name in names:
        stage_cls, scfg = stage_class(name), getattr(cfg, name)
        target = only is None or name == only
        try:
            inputs, input_fps = _resolve_inputs(name, stage_cls, scfg, artifacts, fps)
        except MissingInput:
            if target:
                raise
            continue  # an earlier stage that has not run: its artifacts are simply not available
        # Defaults are left out of the hash so that a new config field (whose default keeps the old
        # behaviour) does not invalidate finished runs; any value a config sets is hashed.
        config_dump = scfg.model_dump(mode="json", exclude_defaults=True)
        sdir = run_dir / name
        stage = stage_cls(scfg, StageContext(name=name, dir=sdir, inputs=inputs, seed=cfg.seed, pipeline=cfg))
        payload = {"stage": name, "config": config_dump, "seed": cfg.seed, "inputs": input_fps,
                   "files": _referenced_files(scfg.model_dump(mode="json")), "prev": prev}
        extra = stage.fingerprint_extra()
        if extra:  # only when there is any: stages without it keep the fingerprints of finished runs
            payload["derived"] = extra
        fp = hash_json(payload)
        if is_complete(sdir, fp) and not (force and name == only):
            log.info("[%s] complete, skipped (config and inputs unchanged)", name)
            summary[name] = {"status": "skipped", **(read_manifest(sdir) or {}).get("metrics", {})}
        elif target:
            summary[name] = {"status": "ran", **_execute(stage, scfg, fp, inputs, run_dir)}
        else:
            continue
        for kind, path in stage.artifacts().items():
            for key in (kind, f"{name}.{kind}"):
                artifacts[key], fps[key] = path, fp
        prev = fp
    return summary


def _execute(stage, scfg, fp: str, inputs: dict, run_dir: Path) -> dict:
    """Run one stage with its manifest kept truthful: running -> complete, or failed with the error."""
    sdir, name = stage.ctx.dir, stage.name
    old = read_manifest(sdir)
    if old and old.get("fingerprint") != fp and sdir.exists():
        log.info("[%s] config or inputs changed: clearing %s", name, sdir)
        shutil.rmtree(sdir)
    elif old and old.get("status") in ("running", "failed"):
        log.info("[%s] resuming after an interrupted run (status %s)", name, old.get("status"))
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sdir / "config.yaml", dump_config(scfg))
    started = time.time()
    write_manifest(sdir, stage=name, status="running", fingerprint=fp, config_hash=hash_json(scfg.model_dump(mode="json")),
                   inputs=inputs, started=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None)
    log.info("[%s] running -> %s", name, sdir)
    try:
        dist = getattr(scfg, "distributed", None)
        if stage.trains and dist is not None and dist.num_processes > 1:
            from .launch import run_distributed

            metrics = run_distributed(stage, scfg, run_dir)
        else:
            metrics = stage.run()
    except BaseException as err:
        write_manifest(sdir, status="failed", error=f"{type(err).__name__}: {err}")
        raise
    seconds = round(time.time() - started, 2)
    write_manifest(sdir, status="complete", metrics=metrics, artifacts=stage.artifacts(), seconds=seconds)
    log.info("[%s] complete in %.1fs", name, seconds)
    return {**metrics, "seconds": seconds}
