"""Ranks never outlive the posttrain process that launched them: torchrun starts each rank in a session of its
own, so a SIGKILL to posttrain (or to its process group) must still end torchrun and every rank."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import QUICKSTART_RECIPE, TINY, write_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")]


def _alive_with(text: str) -> list[int]:
    """Pids of the live (not zombie) processes whose command line contains `text`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # not a process, or it ended while we looked
        if text in cmdline and state != "Z":  # an orphan's zombie waits for init to reap it: it runs nothing
            pids.append(int(proc.name))
    return pids


def _wait_for(check, seconds: float):
    deadline = time.time() + seconds
    while not (found := check()) and time.time() < deadline:
        time.sleep(0.1)
    return found


@pytest.mark.parametrize("kill_group", [True, False], ids=["process-group", "posttrain-only"])
def test_sigkill_of_posttrain_ends_its_ranks(tmp_path, kill_group):
    sft = {"max_steps": 100000, "batch_size": 4, "save_steps": 1, "eval_steps": 100000, "eval_samples": 0}
    sft["distributed"] = {"num_processes": 2, "zero_stage": 0}
    body = (
        f"seed: 0\nthreads: 1\nstages: [synth, base, sft]\n"
        f"synth: {{recipe: {QUICKSTART_RECIPE}, num_train: 40, num_eval: 8}}\n"
        f"base: {json.dumps({**TINY, 'family': 'llama'})}\nsft: {json.dumps(sft)}\n"
    )
    sft_dir = tmp_path / "run" / "sft"
    spec = str(sft_dir / "launch.json")  # on the command line of torchrun and of each rank, and no other's
    cmd = [sys.executable, "-m", "posttrain.cli", "run", write_pipeline(tmp_path, body)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        trained = _wait_for(lambda: list(sft_dir.glob("checkpoints/*checkpoint-*")) or proc.poll() is not None, 240)
        assert trained and proc.poll() is None, "posttrain ended or wrote no checkpoint before the deadline"
        assert len(_alive_with(spec)) == 3  # torchrun and its 2 ranks, training
        if kill_group:  # what the tester did: the ranks sit in sessions of their own, out of the signal's reach
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # torchrun too is left to the parent-death signal
            proc.kill()
        proc.wait()
        gone = _wait_for(lambda: not _alive_with(spec), 10)
        assert gone, f"still running 10s after posttrain was killed: pids {_alive_with(spec)}"
    finally:
        for pid in _alive_with(spec):  # on failure: leave no rank training in the background
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
