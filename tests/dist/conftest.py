"""Multi-process tests: real torchrun launches over gloo on CPU.

Every launch shares one environment: the repository on PYTHONPATH, the venv's
bin first on PATH (DeepSpeed JIT-builds its shared-memory comm op with the
first ``ninja`` found; two ninja versions sharing one build folder rebuild it
every time), one extension cache per venv, and a 1-minute collective timeout
so a dead rank fails a test instead of hanging it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
EXTENSIONS = Path(sys.prefix) / "torch_extensions"


def dist_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
        TORCH_EXTENSIONS_DIR=str(EXTENSIONS),
        DEEPSPEED_TIMEOUT="1",
        PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning",
        OMP_NUM_THREADS="1",
        STAR_SCALE_LOG="INFO",
    )
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, *args: str, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), *args]


def free_port() -> int:
    """A port the OS has just handed out: fixed ranges collide with other test runs on the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, *args: str, log: Path, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Run one launch to completion; its combined output goes to ``log`` (shown on failure)."""
    with open(log, "w") as f:
        out = subprocess.run(torchrun_cmd(nproc, *args, port=free_port()), env=dist_env(), cwd=ROOT,
                             stdout=f, stderr=subprocess.STDOUT, timeout=timeout, **popen)
    if out.returncode:
        tail = log.read_text()[-6000:]
        pytest.fail(f"torchrun {' '.join(args)} exited {out.returncode}; log {log}:\n{tail}")
    return out


def launch_worker(tmp_path_factory, worker: str, name: str, nproc: int = 2) -> list[dict]:
    """Launch ``worker OUT`` on ``nproc`` ranks; each rank writes ``OUT/{name}.rank{r}.json``: return them."""
    out = tmp_path_factory.mktemp(name)
    run_torchrun(nproc, worker, str(out), log=out / f"{name}.log")
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="session", autouse=True)
def shm_comm_op(tmp_path_factory):
    """Build DeepSpeed's CPU comm op once, before several ranks would race to build it."""
    so = EXTENSIONS / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    if so.exists():
        return
    log = tmp_path_factory.mktemp("warmup") / "warmup.log"
    code = "from star_scale.parallel.layout import init_layout, shutdown; init_layout(1); shutdown()"
    run_torchrun(1, "--no-python", sys.executable, "-c", code, log=log, timeout=600)


@pytest.fixture(scope="session")
def token_store(tmp_path_factory) -> Path:
    """1024 images x 10 crops x 16 tokens: four 256-image chunks, enough for 2 data-parallel ranks."""
    from star_scale.data.store import save_npz_store

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tokens") / "tokens.npz"
    save_npz_store(path, rng.integers(0, 64, (1024, 10, 16)).astype(np.uint16),
                   rng.integers(0, 4, 1024).astype(np.int32), codebook_size=64, num_classes=4)
    return path
