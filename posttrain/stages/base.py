"""The stage contract: every stage has a typed config and the same lifecycle, setup -> train -> save,
then cleanup (always called, also after a failure: it frees engines and processes the stage started).

A stage reads its inputs by path (artifacts of earlier stages, or paths its config names), writes only
inside its own directory `run_dir/<stage>/`, and returns metrics. The pipeline runner does the
bookkeeping (manifests, skipping, resuming); the launcher decides in how many processes it runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import Section


@dataclass
class StageContext:
    """What a stage gets from the runner."""

    name: str
    """The stage's name, also its directory under run_dir."""
    dir: Path
    """run_dir/<name>: the only place the stage writes."""
    inputs: dict[str, str]
    """Input name -> path (an earlier stage's artifact, or a path from the stage config)."""
    seed: int
    """The pipeline seed."""
    pipeline: Any = None
    """The whole resolved pipeline config (read-only), for stages that need shared sections."""
    rank: int = 0
    """This process's rank when the launcher runs the stage in several processes."""
    world_size: int = 1
    """How many processes run the stage."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The device this process computes on (dist.rank.resolve_device: cuda:LOCAL_RANK on GPUs)."""
    device_request: str = "auto"
    """The pipeline's `device` setting the device was resolved from (ranks resolve it again)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16: the stage's own `precision`, else the pipeline's."""
    report_to: list = field(default_factory=list)
    """Experiment trackers: the stage's own `report_to`, else the pipeline's (empty: none)."""
    artifacts: dict = field(default_factory=dict)
    """`NAME.KIND` -> path of every earlier instance's artifact in this run (what references resolve to)."""
    kinds: dict = field(default_factory=dict)
    """Instance name -> stage kind, for every stage of the pipeline."""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("posttrain"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Stage:
    """Base class: subclasses set the class attributes and implement the three lifecycle steps."""

    name: ClassVar[str]
    Config: ClassVar[type[Section]]
    consumes: ClassVar[dict[str, str]] = {}
    """Input name -> artifact key it defaults to ('kind' = latest stage producing it, or 'stage.kind')."""
    optional_inputs: ClassVar[set[str]] = set()
    """Inputs that may be absent (see `optional_for`)."""
    input_hints: ClassVar[dict[str, str]] = {}
    """Input name -> what else provides it, for the error when it is missing."""
    produces: ClassVar[dict[str, str]] = {}
    """Artifact kind -> path relative to the stage directory."""
    trains: ClassVar[bool] = False
    """True if the stage trains weights (several processes then mean DeepSpeed ranks)."""

    def __init__(self, cfg: Section, ctx: StageContext):
        self.cfg = cfg
        self.ctx = ctx
        self.log = ctx.log

    def artifacts(self) -> dict[str, str]:
        """Artifact kind -> absolute path, once the stage is complete (default: `produces`)."""
        return {kind: str(self.ctx.dir / rel) for kind, rel in self.produces.items()}

    @classmethod
    def optional_for(cls, cfg) -> set[str]:
        """The inputs that may be absent under this config (default: `optional_inputs`)."""
        return cls.optional_inputs

    @classmethod
    def inputs_read(cls, cfg) -> dict[str, str]:
        """The inputs (input -> artifact kind) this config reads: a subset of `consumes`, which the runner
        resolves, fingerprints and `posttrain show` lists. Default: all of them."""
        return cls.consumes

    @classmethod
    def sections_read(cls, name: str, pipeline) -> set[str]:
        """The config sections instance `name` reads: its own, and for some kinds other stages' settings
        (the filter's length limit is its training stage's max_length and tokenizer). Default: its own."""
        return {name}

    @classmethod
    def check_plan(cls, name: str, cfg, inputs: dict, artifacts: dict, kinds: dict) -> None:
        """Raise a ConfigError naming the key (`name`.key) for what is wrong in `cfg` given its planned inputs:
        called by the pre-run check, where `inputs` and `artifacts` (NAME.KIND -> path) hold the references of
        outputs not made yet, and again before the stage clears its directory, with their paths. `kinds`:
        instance -> kind (of the stages before it at least). Cheap: no loading. Default: nothing to check."""

    def fingerprint_extra(self) -> dict:
        """Settings the stage takes from outside its own section (other stages' keys, files they name):
        the runner hashes them into the fingerprint, so that changing one re-runs the stage. Cheap: no
        loading. Default: none."""
        return {}

    def setup(self) -> None:
        """Load inputs, build models and data."""

    def train(self) -> dict:
        """Do the work; return metrics."""
        return {}

    def save(self) -> dict:
        """Write the stage's artifacts (atomically); return final metrics."""
        return {}

    def cleanup(self) -> None:
        """Free what the stage holds outside Python's reach; always called. By default: close the
        generation engine a stage keeps in `self.engine` (vLLM holds memory and, under ranks, groups)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()

    def run(self) -> dict:
        """setup -> train -> save; the caller calls `cleanup()` afterwards, whatever happened."""
        self.setup()
        metrics = dict(self.train() or {})
        metrics.update(self.save() or {})
        return metrics
