"""Fault injection against the real command line: kill -9, damaged checkpoints, a full disk, two jobs, bad input.

Every test runs ``python -m star_scale.cli`` from the repository root in its own
process (one thread), on a model small enough that a run takes seconds.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from star_scale.data.store import save_npz_store

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["model.preset=tiny", "model.vocab_size=64", "model.num_classes=4", "model.grid_size=4"]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", STAR_SCALE_LOG="INFO")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    return e


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "star_scale.cli", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def start(*args, **extra_env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "star_scale.cli", *map(str, args)], cwd=ROOT,
                            env={**env(), **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def errors(stderr: str) -> list[str]:
    """The lines a user reads as errors: star-scale's own, and any traceback."""
    raised = re.compile(r"^[\w.]+(Error|Exception|Interrupt)\b")  # the last line of a traceback
    return [l for l in stderr.splitlines() if l.startswith("star-scale") or "Traceback" in l or raised.match(l)]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file below ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def train_args(tmp_path):
    """``train`` arguments for a tiny run on a random token store; more overrides as arguments."""
    rng = np.random.default_rng(0)
    store = tmp_path / "tokens.npz"
    save_npz_store(store, rng.integers(0, 64, (128, 10, 16)).astype(np.uint16),
                   rng.integers(0, 4, 128).astype(np.int32), codebook_size=64, num_classes=4, chunk_size=16)

    def make(out: Path, *overrides) -> list[str]:
        return ["train", *MODEL, f"data.path={store}", "data.global_batch=8", "optimizer.lr=1e-3",
                "optimizer.lr_batch=null", "train.log_every=1000", "train.ckpt_every=3", "tracking.enabled=false",
                f"train.out_dir={out}", *overrides]
    return make
