"""The parent side of a multi-process stage: write its spec, start N torchrun ranks, read rank 0's result.

Each rank runs `python -m posttrain.launch SPEC` (see posttrain/launch.py), which rebuilds the stage from
the spec and runs the same lifecycle; rank 0 writes the outputs. Multi-node users start that module with
their own torchrun line (`torchrun --nnodes ... -m posttrain.launch run_dir/<stage>/launch.json`).

Lifetime: torchrun starts each rank in a session of its own, so a signal to posttrain's process group never
reaches the ranks. Two links keep them from outliving posttrain (even under SIGKILL, which nothing can
catch): torchrun gets a parent-death signal (`_die_with_parent`), and each rank exits once torchrun is gone
(posttrain.launch's watchdog).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..manifest import atomic_write_json

log = logging.getLogger("posttrain")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when the thread that started it exits (Linux)."""


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child (torchrun) get SIGKILL when this process dies, or None off Linux.

    SIGKILL, not SIGTERM: torchrun holds nothing worth saving, and its ranks exit by themselves once it is gone.
    The signal follows the *thread* that forks; the forking thread waits in `subprocess.run` until torchrun
    exits (or kills it), so it outlives torchrun whichever thread calls us. prctl is looked up here, before
    the fork: the child runs only the call itself, no import or lookup that could take a lock."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: no signal would come
            os._exit(1)

    return preexec


def run_distributed(stage, scfg, run_dir: Path, num_processes: int) -> dict:
    """Run `stage` as `num_processes` local ranks; return rank 0's metrics."""
    ctx = stage.ctx
    spec_path, result_path = ctx.dir / "launch.json", ctx.dir / "result.json"
    result_path.unlink(missing_ok=True)
    atomic_write_json(
        spec_path,
        {
            "stage": stage.ctx.name,
            "kind": type(stage).name,
            "config": scfg.model_dump(mode="json"),
            "inputs": ctx.inputs,
            "seed": ctx.seed,
            "dir": str(ctx.dir),
            "device": ctx.device_request,
            "precision": ctx.precision,
            "report_to": ctx.report_to,
            "pipeline": str(run_dir / "config.yaml"),
        },
    )
    threads = ctx.pipeline.threads if ctx.pipeline is not None and ctx.pipeline.threads else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "POSTTRAIN_THREADS": str(threads)}
    env["POSTTRAIN_LAUNCHER_PID"] = str(os.getpid())  # ranks check that torchrun is still ours (launch.py)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(num_processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "posttrain.launch",
        str(spec_path),
    ]
    dist = getattr(scfg, "distributed", None)
    zero = f" (ZeRO-{dist.zero_stage})" if dist is not None and getattr(stage, "trains", False) else ""
    log.info("[%s] launching %d processes%s: %s", stage.ctx.name, num_processes, zero, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, preexec_fn=_die_with_parent())
    if proc.returncode != 0:
        raise RuntimeError(
            f"stage {stage.ctx.name!r}: distributed run exited with code {proc.returncode} "
            f"(see the log above; spec in {spec_path})"
        )
    return json.loads(result_path.read_text())
