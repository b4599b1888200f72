"""A disk that fills up during a checkpoint: one message, no temporary folder left, resumable once space is freed."""
import shutil

import pytest

from star_scale.train.checkpoint import CheckpointDir
from tests.faults.conftest import cli, errors, metrics


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("6m")


def test_disk_full_during_a_checkpoint(train_args, small_disk):
    run = small_disk / "run"
    args = lambda *o: train_args(run, "train.ckpt_every=2", "train.keep_checkpoints=3", *o)
    first = cli(*args("train.steps=2"))
    assert first.returncode == 0, first.stderr
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step_00000002").iterdir())
    filler = small_disk / "filler"  # leave one page: the checkpoint fails, and so do mlflow's sqlite writes
    with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - 4096))
    assert shutil.disk_usage(small_disk).free < size

    full = cli(*args("train.steps=6", "tracking.enabled=true"))  # mlflow's sqlite on the full disk too
    assert full.returncode == 1
    lines = errors(full.stderr)
    assert len(lines) == 1, full.stderr  # no traceback, mlflow's included
    [message] = lines
    assert message.startswith("star-scale: error: checkpoint ") and str(run / "checkpoints" / "step_00000004") in message
    assert "bytes are free" in message and "needs about" in message
    ckpts = CheckpointDir(run / "checkpoints")
    assert ckpts.steps() == [2] and ckpts.verify(2) is None  # the previous checkpoint is still the latest
    assert not list((run / "checkpoints").glob(".tmp-*"))

    filler.unlink()
    resumed = cli(*args("train.steps=6"))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]  # none lost, none twice
    assert CheckpointDir(run / "checkpoints").steps() == [2, 4, 6]
