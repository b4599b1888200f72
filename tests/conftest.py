import signal

import numpy as np
import pytest
import torch

from star_scale.config import load_config
from star_scale.data.store import save_npz_store


def pytest_configure(config):
    # A SIGTERM (a CI timeout, `kill`) ends the run as Ctrl-C does: fixtures tear down, so local
    # Slurm clusters (their daemons, namespaces and links), servers and mounts are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


TINY = ["model.preset=tiny", "model.vocab_size=64", "model.num_classes=4", "model.grid_size=4"]


@pytest.fixture
def token_npz(tmp_path):
    """A small random token store: 128 images x 10 crops x 16 tokens, 4 classes."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 64, (128, 10, 16)).astype(np.uint16)
    labels = rng.integers(0, 4, 128).astype(np.int32)
    path = tmp_path / "tokens.npz"
    save_npz_store(path, codes, labels, codebook_size=64, num_classes=4, chunk_size=16)  # 8 chunks: 2 ranks
    return path


@pytest.fixture
def tiny_cfg(tmp_path, token_npz):
    """Build a tiny CPU training config; extra overrides as arguments."""
    def make(*overrides, out="run"):
        return load_config(None, TINY + [
            f"data.path={token_npz}", "data.global_batch=16", "train.steps=6", "train.log_every=2",
            "train.ckpt_every=3", f"train.out_dir={tmp_path / out}", "optimizer.lr=1e-3",
            "optimizer.lr_batch=null", "tracking.enabled=false", *overrides])
    return make


@pytest.fixture
def one_thread():
    """Torch on one thread: on a loaded 2-core machine, 2 threads can be many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a fresh tmpfs of that size (e.g. "6m"), unmounted afterwards whatever happens."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size: str):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounted:
            subprocess.run(["umount", "-l", str(where)], check=True)
