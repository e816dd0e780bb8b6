"""The rank side of a multi-process stage: `python -m posttrain.launch run_dir/<stage>/launch.json`.

torchrun starts one of these per rank (posttrain.dist.launcher writes the spec and starts them; for
several nodes, run your own `torchrun --nnodes N ... -m posttrain.launch SPEC`). Each rank binds its
device (cuda:LOCAL_RANK on GPUs, or the pipeline's `device`), rebuilds the stage from the spec and runs
its lifecycle; rank 0 writes result.json with the metrics. A rank exits as soon as its torchrun is gone
(`exit_with_launcher`): torchrun starts ranks in sessions of their own, so nothing else would stop them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

ORPHAN_EXIT_CODE = 3
"""A rank's exit code when it stops because its torchrun is gone."""


def exit_with_launcher(poll_s: float = 0.2) -> None:
    """Exit this rank promptly once the process that started it (torchrun) is gone.

    torchrun puts each rank in a new session, so killing posttrain's process group (even by SIGKILL) would
    leave the ranks training and writing checkpoints beside the re-run. A dead parent shows as a changed
    getppid() (the orphan is re-parented to init or a subreaper). A parent-death signal cannot stand in for
    this: it would follow whichever torchrun thread forked the rank, not torchrun's life. Only under a
    launcher (LOCAL_RANK set): a rank started by hand, e.g. under nohup, is left alone."""
    if "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()
    if _adopted(parent):
        _leave(parent)
    threading.Thread(target=_watch, args=(parent, poll_s), name="posttrain-launcher-watchdog", daemon=True).start()


def _adopted(parent: int) -> bool:
    """Whether torchrun died before this rank could note its pid: `parent` is then whoever adopted the rank,
    not a child of the posttrain process that started torchrun (POSTTRAIN_LAUNCHER_PID). Reads /proc (Linux);
    False where it cannot tell, e.g. under a torchrun started by hand."""
    launcher = os.environ.get("POSTTRAIN_LAUNCHER_PID")
    try:
        stat = Path(f"/proc/{parent}/stat").read_text()
    except OSError:
        return False
    return launcher is not None and stat.rsplit(")", 1)[1].split()[1] != launcher  # "pid (comm) state ppid ..."


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    _leave(parent)


def _leave(parent: int) -> None:
    print(
        f"posttrain rank {os.environ.get('RANK', '?')}: its launcher (pid {parent}) is gone: exiting",
        file=sys.stderr,
        flush=True,
    )
    os._exit(ORPHAN_EXIT_CODE)  # no cleanup: it could block on collectives whose peers are dying too


def worker_main(spec_path: str) -> None:
    """Entry point of each rank: rebuild the stage from the spec and run its lifecycle."""
    exit_with_launcher()  # before the imports (seconds): a rank orphaned by then must not go on to train
    import torch

    from .dist.rank import resolve_device, world
    from .dist.trainable import init_process_state
    from .manifest import atomic_write_json
    from .pipeline import load_pipeline
    from .stages import StageContext, stage_class

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
