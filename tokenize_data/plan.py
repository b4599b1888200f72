"""Unit bookkeeping of the tokenization job: done markers, per-unit locks, data checksums and the Plan."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from star_scale.data import schema

CROPS = 10
# File names that are not valid UTF-8 travel as surrogate escapes (os.fsdecode) and are written back byte for byte.
NAMES = "surrogateescape"


class JobError(RuntimeError):
    pass


# ---- small file helpers ------------------------------------------------------
def _marker(out: Path, unit: int) -> Path:
    return out / schema.JOB_DIR / "done" / f"unit-{unit:06d}.json"


def _lockfile(out: Path, unit: int) -> Path:
    return out / schema.JOB_DIR / "locks" / f"unit-{unit:06d}.lock"


@contextmanager
def _unit_lock(out: Path, unit: int):
    """Non-blocking flock (released by the kernel if the holder dies); yields False when another process holds it."""
    path = _lockfile(out, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:  # file system without flock: rely on the static unit split alone
            pass
        yield True
    finally:
        os.close(fd)


# ---- the plan -------------------------------------------------------------------
@dataclass
class Plan:
    out: Path
    attrs: dict
    paths: list  # row -> path (relative to root or absolute)
    labels: np.ndarray  # row -> label

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def shard_size(self) -> int:
        return int(self.attrs["shard_size"])

    @property
    def num_units(self) -> int:
        return -(-self.n // self.shard_size)

    def rows(self, unit: int) -> range:
        return range(unit * self.shard_size, min(self.n, (unit + 1) * self.shard_size))

    def abspath(self, row: int) -> str:
        p = self.paths[row]
        return p if os.path.isabs(p) else os.path.join(self.attrs["source"]["root"], p)

    def done(self, unit: int) -> bool:
        return _marker(self.out, unit).is_file()


def _read_plan(out: Path) -> Plan:
    import zarr

    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    if attrs.get("format") != schema.FORMAT:
        raise JobError(f"{out} is a Zarr group but not a star-scale token store")
    paths, labels = [], []
    with open(out / schema.SOURCES_FILE, encoding="utf-8", errors=NAMES, newline="\n") as f:
        for line in f:
            p, lab = line.rstrip("\n").rsplit("\t", 1)
            paths.append(p)
            labels.append(int(lab))
    if len(paths) != attrs["source"]["count"]:
        raise JobError(f"{out / schema.SOURCES_FILE}: {len(paths)} rows, attributes say {attrs['source']['count']}")
    return Plan(out, attrs, paths, np.asarray(labels, dtype=np.int64))


def _sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
