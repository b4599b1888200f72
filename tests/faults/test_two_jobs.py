"""Two `train` commands on one run folder: the second is refused naming the first; the lock dies with its holder."""
import os
import signal

from tests.faults.conftest import cli, errors, metrics, start, wait_for


def test_second_training_on_the_same_folder_is_refused(train_args, tmp_path):
    run = tmp_path / "run"
    first = start(*train_args(run, "train.steps=1000000", "train.ckpt_every=50", "tracking.enabled=true"))
    try:
        wait_for(lambda: len(metrics(run)) > 0 or first.poll() is not None, what="the first job's first step")
        second = cli(*train_args(run, "train.steps=1000000", "tracking.enabled=true"))
        assert second.returncode == 2
        [message] = errors(second.stderr)
        assert message.startswith(f"star-scale: error: {run} is in use by another training job")
        assert f"pid {first.pid}" in message and "since " in message
        assert first.poll() is None  # the first job runs on
        lines = metrics(run)
        assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))  # every step once
    finally:
        os.kill(first.pid, signal.SIGKILL)  # kill -9: the kernel releases the lock
        first.wait()


def test_lock_is_rank_0s_and_can_be_switched_off(tmp_path):
    import pytest

    from star_scale.config import load_config
    from star_scale.train import run_folder
    from star_scale.train.errors import RunFolderError

    cfg = load_config(None, [f"train.out_dir={tmp_path / 'run'}"])
    with run_folder.claim(cfg, is_main=True):
        with pytest.raises(RunFolderError, match=rf"is in use by another training job \(host \S+, pid {os.getpid()},"):
            with run_folder.claim(cfg, is_main=True):
                pass
        with run_folder.claim(cfg, is_main=False):  # other ranks do not take it
            pass
        unlocked = load_config(None, [f"train.out_dir={tmp_path / 'run'}", "train.lock=false"])
        with run_folder.claim(unlocked, is_main=True):
            pass
    with run_folder.claim(cfg, is_main=True):  # released on exit
        pass
