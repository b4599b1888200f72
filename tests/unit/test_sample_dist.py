"""`star-scale sample` as real processes: 1 rank vs 2 torchrun ranks, and a SIGKILLed job resumed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from star_scale.models.gpt import GPT, GPTArgs
from star_scale.models.model_file import save_model_file
from star_scale.tokenizer import PatchTokenizer

REPO = Path(__file__).resolve().parents[2]
N, BATCH = 80, 2  # 40 batches: long enough to kill a job in the middle


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample_dist")
    torch.manual_seed(0)
    model = GPT(GPTArgs(layers=2, heads=2, width=32, vocab_size=64, num_classes=4, grid_size=8, ffn_multiple_of=32))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    save_model_file(model, d / "model.pt")
    torch.manual_seed(1)
    PatchTokenizer(torch.rand(64, 48), image_size=32, patch=4).save(d / "tok.pt")
    return d


def command(d: Path, out: str, *extra) -> list:
    return ["-m", "star_scale.evaluate.sample", str(d / "model.pt"), "--tokenizer", str(d / "tok.pt"), "--out", str(d / out),
            "--num-samples", str(N), "--batch-size", str(BATCH), "--seed", "3", "--cfg-scale", "1.5", "--top-k", "40",
            "--grid", "16", *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(args, **kw):
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def reference(files):
    run(command(files, "ref.npz"))
    with np.load(files / "ref.npz") as f:
        return f["arr_0"], f["arr_1"]


def test_one_rank_and_two_torchrun_ranks_give_identical_arrays(files, reference):
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command(files, "two.npz")])
    assert "rank 1 of 2 made 20 batches" in r.stderr and "rank 0 of 2 made 20 batches" in r.stderr
    with np.load(files / "two.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (N, 32, 32, 3)
        np.testing.assert_array_equal(f["arr_0"], reference[0])
        np.testing.assert_array_equal(f["arr_1"], reference[1])
    assert (files / "two.png").exists()


def test_killed_job_resumes_to_the_same_npz(files, reference):
    work = files / "killed.npz.parts"
    proc = subprocess.Popen([sys.executable, *command(files, "killed.npz")], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(work.glob("batch_*.npz"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = {p.name: p.stat().st_mtime_ns for p in work.glob("batch_*.npz")}
    assert 3 <= len(done) < N // BATCH and not (files / "killed.npz").exists()

    r = run(command(files, "killed.npz", "--keep-parts"))
    assert f"{len(done)} of its {N // BATCH} were already done" in r.stderr
    for name, mtime in done.items():  # finished batches were kept, not remade
        assert (work / name).stat().st_mtime_ns == mtime
    with np.load(files / "killed.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], reference[0])
        np.testing.assert_array_equal(f["arr_1"], reference[1])
