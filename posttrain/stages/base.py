"""The stage contract: every stage has a typed config and the same lifecycle, setup -> train -> save.

A stage reads its inputs by path (artifacts of earlier stages, or paths its config names), writes only
inside its own directory `run_dir/<stage>/`, and returns metrics. The pipeline runner does the
bookkeeping (manifests, skipping, resuming); the launcher decides in how many processes it runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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
    """Inputs that may be absent."""
    produces: ClassVar[dict[str, str]] = {}
    """Artifact kind -> path relative to the stage directory."""
    trains: ClassVar[bool] = False
    """True if the launcher may run this stage as several (DeepSpeed) processes."""

    def __init__(self, cfg: Section, ctx: StageContext):
        self.cfg = cfg
        self.ctx = ctx
        self.log = ctx.log

    def artifacts(self) -> dict[str, str]:
        """Artifact kind -> absolute path, once the stage is complete (default: `produces`)."""
        return {kind: str(self.ctx.dir / rel) for kind, rel in self.produces.items()}

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

    def run(self) -> dict:
        self.setup()
        metrics = dict(self.train() or {})
        metrics.update(self.save() or {})
        return metrics
