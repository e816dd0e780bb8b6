"""The pipeline config and its runner: stages in order, artifacts handed on by path, done work skipped.

A stage's fingerprint hashes its config, the seed, the precision it inherits (when not fp32), the
fingerprints of its inputs and the fingerprint of the stage before it. A stage whose manifest is complete
with the same fingerprint is skipped; one whose config or inputs changed re-runs, and so does everything
after it. A stage that crashed (manifest still 'running') re-runs with its directory kept, so it can resume
from its checkpoints.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from pathlib import Path
from typing import Optional, Union

import torch
from pydantic import Field, create_model, field_validator

from .config import ConfigError, Precision, Section, TrackingBackend, dump_config, load_config
from .data import is_spec, source_fingerprint, source_json
from .graph import (
    StageEntry,
    artifact_keys,
    check_entries,
    check_rule_files,
    entries,
    named_files,
    resolve_references,
)
from .graph import references as references_in
from .dist.launcher import run_distributed
from .dist.rank import resolve_device
from .manifest import (
    atomic_write_text,
    clear_stale_temps,
    hash_json,
    hash_path,
    is_complete,
    read_manifest,
    run_dir_lock,
    write_manifest,
)
from .paths import check_writable_dir
from .tracking import missing_packages
from .stages import STAGE_MODULES, StageContext, stage_class

log = logging.getLogger("posttrain")


class PipelineBase(Section):
    """Top-level keys shared by every pipeline config; each stage adds a section named after it."""

    run_dir: str = "runs/default"
    """Directory for everything the run writes (one subdirectory per stage)."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seed for data generation, model initialisation and training (0 to 2**32 - 1, numpy's range)."""
    threads: Optional[int] = Field(None, ge=1)
    """torch CPU threads per process (None: torch's default)."""
    device: str = "auto"
    """Where stages compute: auto (cuda:LOCAL_RANK where CUDA is present, else cpu), cpu, cuda or cuda:N."""
    precision: Precision = "fp32"
    """fp32, bf16 or fp16 (mixed precision: fp32 master weights; inference models and saved weights in
    this dtype); a stage's own `precision` key overrides it."""
    report_to: list[TrackingBackend] = []
    """Experiment trackers (tensorboard, wandb, trackio, mlflow) for the training stages; [] = nothing is
    sent anywhere. A stage's own `report_to` overrides it."""
    stages: list[Union[str, StageEntry]]
    """Stages to run, in order: a kind (e.g. [synth, base, sft]), or {name: NAME, kind: KIND} for a named
    instance, so that a kind can run several times (each instance's settings are the section NAME)."""

    @field_validator("stages")
    @classmethod
    def _known_unique(cls, stages: list) -> list:
        return check_entries(stages)

    def instances(self) -> list[tuple[str, str]]:
        """(name, kind) of every stage instance, in order."""
        return entries(self.stages)


@functools.cache
def pipeline_model(named: tuple[tuple[str, str], ...] = ()) -> type[PipelineBase]:
    """PipelineBase plus one optional section per stage kind and per named instance `(name, kind)` (its
    kind's defaults apply when absent)."""
    fields = {}
    for name, kind in [(k, k) for k in STAGE_MODULES] + list(named):
        cfg_cls = stage_class(kind).Config
        fields[name] = (cfg_cls, Field(default_factory=cfg_cls, description=f"Settings of the {name} stage ({kind})."))
    return create_model("PipelineConfig", __base__=PipelineBase, **fields)


def _named_instances(data: dict) -> tuple[tuple[str, str], ...]:
    """The {name, kind} entries of a raw config's `stages` whose name is not a kind (well-formed ones only:
    anything else is left to validation, which names the key and line)."""
    found = []
    for item in data.get("stages") or [] if isinstance(data.get("stages"), list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str) and item.get("kind") in STAGE_MODULES:
            if item["name"] not in STAGE_MODULES:
                found.append((item["name"], item["kind"]))
    return tuple(found)


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineBase:
    """Read and validate a pipeline config: unknown keys, wrong types and bad paths name the key and line."""
    return load_config(lambda data: pipeline_model(_named_instances(data)), path, overrides)


def _sections_read(cfg: PipelineBase, running: set[str]) -> set[str]:
    """The config sections the stages in `running` read (a stage command may add its kind)."""
    kinds = {**{name: name for name in running}, **dict(cfg.instances())}
    return set().union(*(stage_class(kinds[name]).sections_read(name, cfg) for name in running))


def idle_overrides(cfg: PipelineBase, overrides: list[str], running: set[str]) -> list[tuple[str, str]]:
    """(override, section) of the dotted overrides that set a stage section (a kind, or a named instance) none
    of `running` reads: every kind has a section, so validation accepts them, but they change nothing here."""
    sections = set(STAGE_MODULES) | {name for name, _ in cfg.instances()}
    read = _sections_read(cfg, running)
    pairs = [(o, o.split("=", 1)[0].split(".")[0].strip()) for o in overrides]
    return [(o, section) for o, section in pairs if section in sections - read]


def idle_kind_sections(cfg: PipelineBase, running: set[str]) -> list[tuple[str, list[str]]]:
    """(kind, instance names) for each section the config sets under a kind's name that this pipeline only
    runs as named instances and that no running stage reads: its settings change nothing (they belong under
    the instances' names)."""
    instances = cfg.instances()
    listed = {name for name, _ in instances} | running
    out = []
    for section in sorted(cfg.model_fields_set & set(STAGE_MODULES) - listed - _sections_read(cfg, running)):
        named = [name for name, kind in instances if kind == section]
        if named:
            out.append((section, named))
    return out


class MissingInput(ConfigError):
    """A stage input that no earlier stage produced and the config does not name."""


def _resolve_inputs(
    name: str, stage_cls, cfg, artifacts: dict, fps: dict, refs: Optional[dict] = None, check_only: bool = False
) -> tuple[dict, dict]:
    """Input name -> path and -> fingerprint: an explicit config path wins over earlier artifacts.

    A data source given as a mapping or a list of them (a mixture), or as the name of a data set in the hub
    cache, is handed on as JSON and fingerprinted by its settings plus the files it reads.
    """
    inputs, input_fps = {}, {}
    for inp, key in stage_cls.inputs_read(cfg).items():
        explicit = getattr(cfg, inp, None)
        if inp in (refs or {}):  # a reference NAME.ARTIFACT, already resolved to that artifact's path
            inputs[inp], input_fps[inp] = artifacts[refs[inp]], fps[refs[inp]]
            continue
        hub_name = isinstance(explicit, str) and not Path(explicit).exists() and explicit not in artifacts
        if is_spec(explicit) or hub_name:
            inputs[inp] = source_json(explicit)
            if not check_only:
                input_fps[inp] = source_fingerprint(explicit)
        elif explicit and str(explicit) in artifacts and not Path(str(explicit)).exists():
            inputs[inp], input_fps[inp] = artifacts[str(explicit)], fps[str(explicit)]  # a "stage.kind" reference
        elif explicit:
            inputs[inp], input_fps[inp] = str(explicit), "" if check_only else hash_path(explicit)
        elif key in artifacts:
            inputs[inp], input_fps[inp] = artifacts[key], fps[key]
        elif inp not in stage_cls.optional_for(cfg):
            settable = f"set {name}.{inp} to a path, or " if inp in type(cfg).model_fields else ""
            hint = f", {stage_cls.input_hints[inp]}" if inp in stage_cls.input_hints else ""
            raise MissingInput(
                f"stage {name!r} needs input {inp!r}: {settable}run a stage that produces {key!r} before it{hint}"
            )
    return inputs, input_fps


def _referenced_files(section) -> dict[str, str]:
    """Fingerprints of the files and directories a stage config names (recipes, reward files, hooks, models,
    data): editing such a file must re-run the stage even though the config text did not change."""
    return {path: hash_path(path) for path in named_files(section)}


def stage_precision(cfg: PipelineBase, scfg) -> str:
    """The stage's own precision when its config sets one, else the pipeline's."""
    return getattr(scfg, "precision", None) or cfg.precision


def stage_trackers(cfg: PipelineBase, scfg) -> list[str]:
    """The stage's own report_to when its config sets one, else the pipeline's."""
    own = getattr(scfg, "report_to", None)
    return list(own if own is not None else cfg.report_to)


def check_trackers(cfg: PipelineBase, names: list[str]) -> None:
    """Every tracker a stage will report to is installed, before any work."""
    for name in names:
        scfg = getattr(cfg, name)
        if not hasattr(scfg, "report_to"):
            continue
        missing = missing_packages(stage_trackers(cfg, scfg))
        if missing:
            key = f"{name}.report_to" if scfg.report_to is not None else "report_to"
            raise ConfigError(
                f"{key}: {', '.join(stage_trackers(cfg, scfg))} needs the package(s) "
                f"{', '.join(missing)}, which are not installed (pip install {' '.join(missing)}), "
                f"or remove them from {key}"
            )


def engine_layouts(scfg) -> dict[str, tuple]:
    """Dotted key of each vLLM sampling section in a stage config -> (tensor_parallel_size, processes)."""
    dist = getattr(scfg, "distributed", None)
    processes = dist.num_processes if dist is not None else 1
    found = {}
    for key, value in scfg:
        if isinstance(value, Section):
            for sub, (tp, _) in engine_layouts(value).items():
                found[f"{key}.{sub}"] = (tp, processes)
        if getattr(value, "backend", None) == "vllm" and hasattr(value, "tensor_parallel_size"):
            found[key] = (value.tensor_parallel_size, processes)
    return found


def check_devices(cfg: PipelineBase, names: list[str]):
    """Resolve the pipeline's device and check every stage's precision and reference placement work there and
    its vLLM engine groups divide its ranks, before any work."""
    for name in names:
        for key, (tp, processes) in engine_layouts(getattr(cfg, name)).items():
            if processes > 1 and processes % tp:
                raise ConfigError(
                    f"{name}.{key}.tensor_parallel_size={tp} does not divide {name}.distributed."
                    f"num_processes={processes}: colocated engines span consecutive groups of ranks"
                )
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise ConfigError(f"device: {err}") from None
    for name in names:
        if stage_precision(cfg, getattr(cfg, name)) == "fp16" and device.type != "cuda":
            key = f"{name}.precision" if getattr(getattr(cfg, name), "precision", None) else "precision"
            raise ConfigError(
                f"{key}: fp16 mixed precision needs a CUDA device (this run computes on {device}); use bf16 or fp32"
            )
        if getattr(getattr(cfg, name), "reference_placement", None) == "cpu" and device.type == "cpu":
            raise ConfigError(
                f"{name}.reference_placement: 'cpu' moves the reference off an accelerator, but this run computes "
                "on cpu: use 'disk' to free its memory between scorings, or 'device'"
            )
    return device


def graph_lines(cfg: PipelineBase) -> list[str]:
    """One line per stage instance: its kind and where each input comes from (`posttrain show`)."""
    producers: dict[str, str] = {}
    lines = []
    for name, kind in cfg.instances():
        stage_cls, scfg = stage_class(kind), getattr(cfg, name)
        refs = dict(references_in(scfg))
        sources = []
        for inp, key in stage_cls.inputs_read(scfg).items():
            explicit = getattr(scfg, inp, None)
            origin = (
                refs.get(inp)
                or (source_json(explicit) if explicit is not None else None)
                or producers.get(key)
                or ("(none)" if inp in stage_cls.optional_for(scfg) else "MISSING")
            )
            sources.append(f"{inp}={origin}")
        sources += [f"{key}={ref}" for key, ref in refs.items() if key not in stage_cls.consumes]
        lines.append(f"{name} ({kind}) <- {', '.join(sources) or 'nothing'}")
        for art in stage_cls.produces:
            producers[art] = f"{name}.{art}"
    return lines


def plan(cfg: PipelineBase, only: Optional[str] = None, start: Optional[str] = None) -> list[tuple[str, str]]:
    """The instances a run visits, in order: all of them; with `only` (an instance, or a kind not listed,
    which is appended), that one with the earlier ones' finished outputs as inputs; with `start`, that one and
    every later one. Raises ConfigError for a name that is not a stage of the pipeline."""
    pairs = cfg.instances()
    names = [n for n, _ in pairs]
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names and not (flag == "--only" and value in STAGE_MODULES):
            raise ConfigError(f"{flag} {value}: not a stage of this pipeline (stages: {', '.join(names)})")
    if only is not None and only not in names:
        named = [n for n, kind in pairs if kind == only]
        if named:  # appending a fresh default stage of that kind is not what a run of one of them means
            raise ConfigError(
                f"--only {only}: this pipeline's {only} stages are named {', '.join(named)}; give one of those names"
            )
        pairs = pairs + [(only, only)]
    return pairs


def preflight(cfg: PipelineBase, pairs: list[tuple[str, str]], targets: set[str]) -> None:
    """Everything that can be known before any work: every input of a stage that will run is produced by an
    earlier stage or named by its config, every reference NAME.ARTIFACT names an earlier instance's artifact,
    and every rule reward and hook file defines its function."""
    artifacts: dict = {}
    kinds: dict = {}
    names = [name for name, _ in pairs]
    for at, (name, kind) in enumerate(pairs):
        stage_cls, scfg = stage_class(kind), getattr(cfg, name)
        if name in targets:
            # An output not made yet stands for itself: its reference NAME.KIND, which the config accepts.
            scfg, refs = resolve_references(scfg, name, artifacts, later=tuple(names[at + 1 :]))
            no_fps = dict.fromkeys(artifacts, "")
            inputs, _ = _resolve_inputs(name, stage_cls, scfg, artifacts, no_fps, refs, check_only=True)
            check_rule_files(scfg, name)
            stage_cls.check_plan(name, scfg, inputs, {k: v for k, v in artifacts.items() if "." in k}, dict(kinds))
        kinds[name] = kind
        for key in artifact_keys(name, stage_cls.produces):
            artifacts[key] = f"{name}.{key.split('.')[-1]}"


def _checked_run_dir(cfg: PipelineBase) -> Path:
    """The run directory, checked to be one or creatable (nothing is created)."""
    try:
        return check_writable_dir(cfg.run_dir)
    except ValueError as err:
        raise ConfigError(f"run_dir: {err}") from None


def check_pipeline(cfg: PipelineBase) -> None:
    """The pre-run check of the whole pipeline, the run-level checks included, running nothing (`posttrain
    show`)."""
    pairs = plan(cfg, None, None)
    names = [name for name, _ in pairs]
    _checked_run_dir(cfg)  # creates nothing
    check_devices(cfg, names)
    check_trackers(cfg, names)
    preflight(cfg, pairs, set(names))


def run_pipeline(
    cfg: PipelineBase, only: Optional[str] = None, force: bool = False, start: Optional[str] = None
) -> dict[str, dict]:
    """Run the configured stages (or just `only`, with earlier stages' finished artifacts as inputs; or
    `start` and everything after it, re-run even if complete)."""
    pairs = plan(cfg, only, start)
    names = [n for n, _ in pairs]
    if only is not None and only not in [n for n, _ in cfg.instances()]:
        log.warning("[%s] not in `stages`: it runs after the last stage, on the run's latest outputs", only)
    targets = set(names[names.index(start) :] if start else [only] if only else names)
    run_dir = _checked_run_dir(cfg)
    device = check_devices(cfg, [n for n in names if n in targets])
    check_trackers(cfg, [n for n in names if n in targets])
    preflight(cfg, pairs, targets)  # of the stages this command runs (all, --only's, --from's)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(run_dir, log):
        return _run_stages(
            cfg,
            pairs,
            targets,
            run_dir,
            device,
            force=force or start is not None,
        )


def _run_stages(cfg: PipelineBase, pairs: list, targets: set, run_dir: Path, device, force: bool) -> dict:
    """Run the target stages in order (`force`: even if complete); earlier finished ones provide inputs."""
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    artifacts, fps, summary = {}, {}, {}
    kinds = dict(pairs)
    prev = hash_json({"seed": cfg.seed})
    unfinished: list[str] = []  # earlier instances left out of this run (--only/--from) and not complete
    for name, kind in pairs:
        stage_cls, scfg = stage_class(kind), getattr(cfg, name)
        target = name in targets
        try:
            scfg, refs = resolve_references(scfg, name, artifacts, tuple(unfinished))
            inputs, input_fps = _resolve_inputs(name, stage_cls, scfg, artifacts, fps, refs)
        except ConfigError:
            if target:
                raise
            unfinished.append(name)
            continue  # an earlier stage that has not run: its artifacts are simply not available
        input_fps.update({f"ref:{key}": fps[ref] for key, ref in refs.items() if key not in input_fps})
        # Defaults are left out of the hash so that a new config field (whose default keeps the old
        # behaviour) does not invalidate finished runs; any value a config sets is hashed. A named instance
        # hashes its kind too; an unnamed one hashes as it always did. References are hashed as written
        # (`sft.model`), their outputs by fingerprint (`ref:` inputs): not the run directory's paths, so a
        # copied or moved run directory skips what is finished.
        written = getattr(cfg, name)
        config_dump = written.model_dump(mode="json", exclude_defaults=True)
        sdir = run_dir / name
        stage = stage_cls(
            scfg,
            StageContext(
                name=name,
                dir=sdir,
                inputs=inputs,
                seed=cfg.seed,
                pipeline=cfg,
                device=device,
                device_request=cfg.device,
                precision=stage_precision(cfg, scfg),
                report_to=stage_trackers(cfg, scfg),
                artifacts={k: v for k, v in artifacts.items() if "." in k},
                kinds=kinds,
            ),
        )
        stage_id = name if name == kind else {"name": name, "kind": kind}
        payload = {
            "stage": stage_id,
            "config": config_dump,
            "seed": cfg.seed,
            "inputs": input_fps,
            "files": _referenced_files(written),
            "prev": prev,
        }
        precision = stage.ctx.precision
        if getattr(scfg, "precision", None) is None and precision != "fp32":
            # The pipeline-wide precision changes what a stage computes and saves; hashed when it is not the
            # default, so fp32 runs keep their fingerprints. (`device` is where, not what: a run may move.)
            payload["precision"] = precision
        extra = stage.fingerprint_extra()
        if extra:  # only when there is any: stages without it keep the fingerprints of finished runs
            payload["derived"] = extra
        fp = hash_json(payload)
        outputs_there = all(Path(p).exists() for p in stage.artifacts().values())
        if is_complete(sdir, fp) and not outputs_there:
            log.warning(
                "[%s] its manifest says complete but outputs are missing (%s): running it again",
                name,
                ", ".join(p for p in stage.artifacts().values() if not Path(p).exists()),
            )
        if is_complete(sdir, fp) and outputs_there and not (force and target):
            if target:
                log.info("[%s] complete, skipped (config and inputs unchanged)", name)
                summary[name] = {"status": "skipped", **(read_manifest(sdir) or {}).get("metrics", {})}
            else:  # `--only`/`--start` left it out: not part of this run's summary, only its inputs
                log.info("[%s] finished earlier: its outputs are inputs of this run", name)
        elif target:
            summary[name] = {"status": "ran", **_execute(stage, scfg, fp, inputs, run_dir)}
        else:
            unfinished.append(name)
            continue
        for key in artifact_keys(name, stage_cls.produces):
            artifacts[key], fps[key] = stage.artifacts()[key.split(".")[-1]], fp
        prev = fp
    return summary


def _execute(stage, scfg, fp: str, inputs: dict, run_dir: Path) -> dict:
    """Run one stage with its manifest kept truthful: running -> complete, or failed with the error (or
    interrupted)."""
    sdir, name = stage.ctx.dir, stage.ctx.name
    type(stage).check_plan(name, scfg, inputs, stage.ctx.artifacts, stage.ctx.kinds)  # before clearing what it made
    old = read_manifest(sdir)
    if old and old.get("fingerprint") != fp and sdir.exists():
        log.info("[%s] config or inputs changed: clearing %s", name, sdir)
        shutil.rmtree(sdir)
    elif old and old.get("status") in ("running", "failed", "interrupted"):
        log.info("[%s] resuming after an interrupted run (status %s)", name, old.get("status"))
        for path in clear_stale_temps(sdir):  # the run directory is locked: no writer is alive to own them
            log.info("[%s] removed %s, left by the interrupted run", name, path.relative_to(sdir))
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sdir / "config.yaml", dump_config(scfg))
    started = time.time()
    dist = getattr(scfg, "distributed", None)
    ranks = dist.num_processes if dist is not None else 1
    device = stage.ctx.device.type + (f" x {ranks}" if ranks > 1 else "")
    write_manifest(
        sdir,
        stage=name,
        kind=type(stage).name,
        status="running",
        fingerprint=fp,
        config_hash=hash_json(scfg.model_dump(mode="json")),
        inputs=inputs,
        device=device,
        precision=stage.ctx.precision,
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        error=None,
    )
    log.info("[%s] running -> %s", name, sdir)
    try:
        if ranks > 1:
            metrics = run_distributed(stage, scfg, run_dir, ranks)
        else:
            try:
                metrics = stage.run()
            finally:
                stage.cleanup()
    except KeyboardInterrupt:
        write_manifest(sdir, status="interrupted", error="interrupted (SIGINT or Ctrl-C)")
        raise
    except BaseException as err:
        write_manifest(sdir, status="failed", error=f"{type(err).__name__}: {err}")
        raise
    seconds = round(time.time() - started, 2)
    write_manifest(sdir, status="complete", metrics=metrics, artifacts=stage.artifacts(), seconds=seconds)
    log.info("[%s] complete in %.1fs", name, seconds)
    return {**metrics, "seconds": seconds}
