"""Atomic, verified checkpoints.

Layout: ``<run>/checkpoints/step_00000100/{state.pt, meta.json}``.  A checkpoint
is written into a temporary folder and renamed into place only when complete,
and ``meta.json`` (written last) records each file's size and sha256.  Loading
takes the newest checkpoint that verifies; a damaged one is skipped with a
warning naming the file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from star_scale.atomic import fsync_dir
from star_scale.train.errors import checkpoint_write_error
from star_scale.trust.load import load_torch

log = logging.getLogger(__name__)
PREFIX = "step_"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def digest(path: Path) -> dict:
    """A meta.json entry: size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def file_problem(folder: Path, name: str, info: dict) -> Optional[str]:
    """None if the file meta.json lists as ``name`` matches ``info``, else what is wrong, naming the file."""
    f = listed_file(folder, name)
    if not f.is_file():
        return f"{f}: missing"
    if f.stat().st_size != info["bytes"]:
        return f"{f}: {f.stat().st_size} bytes, expected {info['bytes']} (truncated?)"
    if _sha256(f) != info["sha256"]:
        return f"{f}: checksum mismatch (corrupted)"
    return None


def listed_file(folder: Path, name: str) -> Path:
    """The file a meta.json entry names: ``shards/rank_00000.bin`` as it is, ``trainer`` as ``trainer.pt``."""
    path = folder / name
    return path if path.suffix in (".bin", ".json", ".pt") else folder / f"{name}.pt"


class CheckpointDir:
    def __init__(self, root: str | os.PathLike, keep: int = 2):
        self.root = Path(root)
        self.keep = keep
        self.expected_bytes = 0  # one checkpoint's estimated size, for the message when a save fails

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit():
                out.append(int(d.name[len(PREFIX):]))
        return sorted(out)

    def path(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:08d}"

    def save(self, step: int, files: dict[str, object]) -> Path:
        """Write ``{name: torch-serialisable object}`` as one checkpoint, atomically.

        A failed write (disk full, I/O error) removes the temporary folder and raises
        CheckpointWriteError; the previous checkpoint stays the latest.
        """
        final = self.path(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        try:
            self._write(tmp, final, step, files)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError ("unexpected pos")
            shutil.rmtree(tmp, ignore_errors=True)
            raise checkpoint_write_error(final, e, self.needed_bytes()) from None
        self.prune(step)
        return final

    def _write(self, tmp: Path, final: Path, step: int, files: dict[str, object]) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"step": step, "files": {}}
        for name, obj in files.items():
            f = tmp / f"{name}.pt"
            with open(f, "wb") as fh:
                torch.save(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
            meta["files"][name] = digest(f)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. on preemption right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)

    def needed_bytes(self) -> int:
        """The newest checkpoint's size, else the estimate."""
        steps = self.steps()
        if not steps:
            return self.expected_bytes
        return max(self.expected_bytes, sum(f.stat().st_size for f in self.path(steps[-1]).rglob("*") if f.is_file()))

    def prune(self, saved: int) -> None:
        """Keep ``keep`` checkpoints: the one just saved (whole, so never removed) and the newest older ones.
        Newer folders (damaged leftovers of an earlier attempt) wait to be overwritten."""
        older = [s for s in self.steps() if s < saved]
        for step in older[: len(older) - (self.keep - 1)] if self.keep > 0 else []:
            shutil.rmtree(self.path(step), ignore_errors=True)

    def verify(self, step: int) -> Optional[str]:
        """None if checkpoint ``step`` is whole, else what is wrong (naming the file)."""
        d = self.path(step)
        meta_path = d / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            return f"{meta_path}: unreadable ({e})"
        for name, info in meta["files"].items():
            problem = file_problem(d, name, info)
            if problem:
                return problem
        return None

    def load_latest(self, map_location="cpu") -> Optional[tuple[int, dict]]:
        """(step, {name: object}) of the newest whole checkpoint, or None."""
        for step in reversed(self.steps()):
            problem = self.verify(step)
            if problem:
                log.warning("skipping damaged checkpoint: %s; falling back to an earlier one", problem)
                continue
            d = self.path(step)
            meta = json.loads((d / "meta.json").read_text())
            objs = {name: load_torch(d / f"{name}.pt", map_location=map_location) for name in meta["files"]}
            return step, objs
        return None
