"""kill -9 of `star-scale train` at a random step, then the same command again: the run it gives is bit-exact."""
import os
import random
import signal

import torch

from tests.faults.conftest import cli, metrics, start, wait_for


def final_weights(run_dir):
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return torch.load(step / "engine.pt", weights_only=False)["module"]


def learned(records):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in records]


def test_kill_9_at_a_random_step_then_resume_is_bit_exact(train_args, tmp_path):
    steps = ["train.steps=60", "train.ckpt_every=5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli(*train_args(full, *steps)).returncode == 0

    kill_at = random.Random().randint(6, 45)
    job = start(*train_args(part, *steps))
    wait_for(lambda: len(metrics(part)) >= kill_at or job.poll() is not None, what=f"step {kill_at}")
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    killed_at = len(metrics(part))
    assert job.returncode == -signal.SIGKILL and killed_at < 60, f"the run ended before the kill at {killed_at}"

    resumed = cli(*train_args(part, *steps))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    # Every line once, values exact; throughput (tokens/s, MFU at log steps) is wall time, not state.
    assert learned(metrics(part)) == learned(metrics(full)), f"killed at step {killed_at}"
    a, b = final_weights(full), final_weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
