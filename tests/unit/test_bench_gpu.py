"""`star-scale bench gpu` on CPU: the reduced run, so the GPU command cannot rot."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.run([sys.executable, "-m", "star_scale.cli", "bench", "gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_explains_the_table():
    out = _run("--help")
    assert out.returncode == 0
    for words in ("tokens/s", "MFU", "plan", "FlexAttention", "images/s", "ZeRO-3", "pytest -m gpu",
                  "bench gpu: reduced CPU run (no CUDA device)"):
        assert words in out.stdout, words


def test_reduced_cpu_run_prints_every_section_and_says_so(tmp_path):
    t0 = time.monotonic()
    out = _run("--json", str(tmp_path / "gpu.json"))
    wall = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "bench gpu: reduced CPU run (no CUDA device)"
    assert wall < 180, wall
    text = " ".join(out.stdout.split())  # column widths vary
    for section in ("train tiny ar", "train tiny star", "attention head 16 flex", "head 16 picked sdpa",
                    "sampling CFG 2.0 batch 4", "zero3 world 1 gloo cpu ok: ZeRO-3", "tests pytest -m gpu"):
        assert section in text, section
    assert "MFU unknown" in text  # a CPU has no peak: never a made-up MFU
    assert "skipped" in text.split("pytest -m gpu")[-1]  # the CUDA tests ran and skipped themselves
