"""The rank side of a multi-process stage: `python -m posttrain.launch run_dir/<stage>/launch.json`.

torchrun starts one of these per rank (posttrain.dist.launcher writes the spec and starts them; for
several nodes, run your own `torchrun --nnodes N ... -m posttrain.launch SPEC`). Each rank binds its
device (cuda:LOCAL_RANK on GPUs, or the pipeline's `device`), rebuilds the stage from the spec and runs
its lifecycle; rank 0 writes result.json with the metrics.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from .dist.rank import resolve_device, world
from .dist.trainable import init_process_state
from .manifest import atomic_write_json
from .pipeline import load_pipeline
from .stages import StageContext, stage_class


def worker_main(spec_path: str) -> None:
    """Entry point of each rank: rebuild the stage from the spec and run its lifecycle."""
    spec = json.loads(Path(spec_path).read_text())
    if os.environ.get("POSTTRAIN_THREADS"):
        torch.set_num_threads(int(os.environ["POSTTRAIN_THREADS"]))
    rank, world_size = world()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    stage_cls = stage_class(spec.get("kind", spec["stage"]))
    cfg = stage_cls.Config.model_validate(spec["config"])
    device = resolve_device(spec.get("device", "auto"))
    init_process_state(cfg.distributed, device)
    ctx = StageContext(
        name=spec["stage"],
        dir=Path(spec["dir"]),
        inputs=spec["inputs"],
        seed=spec["seed"],
        pipeline=load_pipeline(spec["pipeline"]),
        rank=rank,
        world_size=world_size,
        device=device,
        device_request=spec.get("device", "auto"),
        precision=spec.get("precision", "fp32"),
        report_to=spec.get("report_to", []),
    )
    stage = stage_cls(cfg, ctx)
    try:
        metrics = stage.run()
    finally:
        stage.cleanup()
    if rank == 0:
        atomic_write_json(Path(spec["dir"]) / "result.json", metrics)
    if torch.distributed.is_initialized():
        # Shut the process group down before exit: gloo's threads left to the interpreter's teardown
        # occasionally abort a rank ("terminate called without an active exception") after the work is done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker_main(sys.argv[1])
