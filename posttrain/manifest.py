"""Run-directory bookkeeping: atomic writes, content fingerprints and per-stage manifests.

A stage is complete only when its manifest says so; everything it produced was written to a temporary
path and renamed into place first, so a crash (or SIGKILL) can never leave output that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"

UMASK = os.umask(0)
os.umask(UMASK)
"""The process's umask, read once at import (reading it means setting it). mkstemp and mkdtemp create
owner-only paths (0600, 0700) on purpose; what we rename into place gets what open() and mkdir would give,
so a run directory or a release is readable by whoever the umask lets read it."""


def temp_file_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temp file in `path`'s directory, to be renamed onto `path`, with the mode a plain
    open() would create it with."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~UMASK)
    return fd, tmp


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to `path` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def widen_to_umask(tree: Path) -> None:
    """Give every file and directory under `tree` at least the mode open() and mkdir would: writers such as
    safetensors (0.8) create their files 0600, and a model directory is for others to load."""
    for path in [tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o7777
        wanted = mode | ((0o777 if path.is_dir() else 0o666) & ~UMASK)
        if wanted != mode:
            path.chmod(wanted)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        widen_to_umask(tmp)  # mkdir's mode, not mkdtemp's 0700; open()'s for what was written inside
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clear_stale_temps(stage_dir: Path) -> list[Path]:
    """Remove what a killed writer left under `stage_dir` (the temp siblings of atomic writes: `.NAME.*.tmp`,
    `.NAME.old`, `.NAME.partial`, a merge's `.NAME.adapters.*`); call it only under the run directory's lock,
    when nothing else writes there. Returns what it removed."""
    stale = [
        p
        for p in Path(stage_dir).rglob(".*")
        if p.name.endswith((".tmp", ".old", ".partial")) or ".adapters." in p.name
    ]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def hash_json(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (key order ignored)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_path(path: str | Path) -> str:
    """Fingerprint of a user-supplied file or directory.

    Files up to 64 MiB are hashed by content; larger files (model shards) by name, size and mtime,
    which is what changes when a checkpoint is rewritten, without reading gigabytes at every start.
    """
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        if st.st_size <= 64 << 20:
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_manifest(stage_dir: str | Path) -> dict | None:
    """The stage's manifest, or None if absent or unreadable (an unreadable one means incomplete)."""
    p = Path(stage_dir) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(stage_dir: str | Path, fingerprint: str) -> bool:
    m = read_manifest(stage_dir)
    return bool(m) and m.get("status") == "complete" and m.get("fingerprint") == fingerprint


def write_manifest(stage_dir: str | Path, **fields: Any) -> dict:
    """Merge `fields` into the stage manifest and write it atomically."""
    m = read_manifest(stage_dir) or {}
    m.update(fields)
    m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(Path(stage_dir) / MANIFEST, m)
    return m


LOCK = ".posttrain.lock"


class RunDirInUse(RuntimeError):
    """Another live process is running a pipeline in this run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def run_dir_lock(run_dir: Path, log=None) -> Iterator[None]:
    """Hold run_dir/.posttrain.lock while a pipeline runs there: a second run on the same directory is
    refused, naming the process holding it; a lock left by a process that no longer exists (a crash, a
    SIGKILL) is taken over with a warning."""
    import socket

    path = Path(run_dir) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            pid = holder.get("pid")
            if isinstance(pid, int) and holder.get("host") == me["host"] and _alive(pid) and pid != me["pid"]:
                raise RunDirInUse(
                    f"run directory {run_dir} is in use by process {pid} (started {holder.get('started')}, "
                    f"lock file {path}); wait for it to finish or stop it, or set another run_dir"
                ) from None
            if log is not None:
                log.warning("taking over %s: the process that held it (%s) is gone", path, holder or "unknown")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
