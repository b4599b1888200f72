"""Run-folder safety: a writable ``train.out_dir``, one writer, no temporary leftovers, no silently lost history.

The lock is an ``flock`` on ``<run>/train.lock`` held by rank 0 for the life of
the job and released by the kernel when the process dies (kill -9 included);
the file names the holder (host, pid, Slurm job, start time).  flock works on
local disks and on NFS v4 (Linux emulates it with POSIX byte-range locks that
the server arbitrates); Lustre needs the client mount option ``flock``
(``localflock`` only locks within one node).  Where locking fails, the job
stops and says so; ``train.lock=false`` turns the lock off.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from star_scale.config import Config, ConfigError
from star_scale.train.errors import RunFolderError

log = logging.getLogger(__name__)
LOCK_FILE = "train.lock"
METRICS = "metrics.jsonl"


def prepare_out_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and write a file into it; ConfigError naming train.out_dir otherwise."""
    key = f"train.out_dir={run_dir}"
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{key}: expected a folder, but {parent} is a file")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{socket.gethostname()}-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}: expected a writable folder ({e.strerror or e}: {e.filename or run_dir})") from None


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
    except ValueError:
        return "holder unknown"
    job = f", Slurm job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
    return f"host {h.get('host')}, pid {h.get('pid')}{job}, since {h.get('started')}"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive, non-blocking flock on the run folder for the ``with`` block; RunFolderError naming the holder."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            raise RunFolderError(f"{run_dir} is in use by another training job ({holder}); "
                                 "wait for it to end or choose another train.out_dir") from None
        except OSError as e:
            raise RunFolderError(f"{path}: cannot lock it ({e.strerror}); if this file system has no working "
                                 "flock and only one job uses the folder, set train.lock=false") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def sweep_temporary(ckpt_root: Path) -> None:
    """Remove checkpoint folders left half-written by a crash or a full disk (only the lock holder calls it)."""
    for tmp in sorted(ckpt_root.glob(".tmp-*")) if ckpt_root.is_dir() else []:
        log.warning("removing %s, an unfinished checkpoint of an earlier job", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def claim(cfg: Config, is_main: bool) -> Iterator[Path]:
    """The run folder, created, written to, locked (rank 0) and swept of temporary checkpoints."""
    run_dir = cfg.run_dir()
    prepare_out_dir(run_dir)
    with run_lock(run_dir) if (is_main and cfg.train.lock) else contextlib.nullcontext():
        if is_main:
            sweep_temporary(run_dir / "checkpoints")
        yield run_dir


def check_history(cfg: Config, ckpts, is_main: bool) -> None:
    """Called when no checkpoint could be loaded: refuse to start over a run's history, unless train.restart=true
    (then rank 0 moves it aside; nothing is deleted)."""
    run_dir = cfg.run_dir()
    metrics = run_dir / METRICS
    lines = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    steps = ckpts.steps()
    if not steps and not lines:
        return
    found = ([f"{metrics} ({lines} lines)"] if lines else []) + \
            [ckpts.verify(s) or f"{ckpts.path(s)}: not loadable" for s in reversed(steps)]
    if not cfg.train.restart:
        raise RunFolderError(f"{run_dir} holds an earlier run but no usable checkpoint: {'; '.join(found)}. Nothing "
                             "was changed; rerun with train.restart=true to move these aside and start from step 0, "
                             "or choose another train.out_dir")
    if not is_main:
        return
    aside = run_dir / f"restart-{time.strftime('%Y%m%d-%H%M%S')}"
    while aside.exists():
        aside = aside.with_name(aside.name + "+")
    aside.mkdir()
    for p in (metrics, ckpts.root):
        if p.exists():
            os.replace(p, aside / p.name)
    log.warning("train.restart=true: moved the earlier run's %s into %s; starting from step 0", ", ".join(found), aside)


def checkpoint_bytes(module) -> int:
    """Expected size of one checkpoint: fp32 weights and buffers, plus AdamW's two moments of the trainable ones."""
    weights = sum(t.numel() for t in module.state_dict().values())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return 4 * (weights + 2 * trainable)


def warn_if_short_of_space(cfg: Config, expected: int) -> None:
    free = shutil.disk_usage(cfg.run_dir()).free
    held = cfg.train.keep_checkpoints + 1 if cfg.train.keep_checkpoints else cfg.train.steps // cfg.train.ckpt_every + 1
    if free < held * expected:
        log.warning("train.out_dir=%s: %d bytes free, but a checkpoint needs about %d bytes and the run holds up to "
                    "%d at once (%d bytes)", cfg.run_dir(), free, expected, held, held * expected)
