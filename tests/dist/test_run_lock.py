"""A 2-rank job holds its run folder through rank 0 alone; a second `train` on the folder is refused naming it."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, dist_env, free_port, torchrun_cmd  # noqa: E402
from test_resume import train_args  # noqa: E402


def test_second_job_is_refused_while_two_ranks_train(tmp_path, token_store):
    run = tmp_path / "run"
    with open(tmp_path / "ranks.log", "w") as f:
        job = subprocess.Popen(torchrun_cmd(2, *train_args(token_store, run, "train.steps=100000", "train.ckpt_every=1000"),
                                            port=free_port()), env=dist_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()) and job.poll() is None:
            assert time.monotonic() < deadline, "the 2-rank job made no step in 300 s"
            time.sleep(0.05)
        assert job.poll() is None, (tmp_path / "ranks.log").read_text()[-4000:]  # rank 1 did not fight for the lock
        holder = json.loads((run / "train.lock").read_text())
        ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if "star_scale.cli" in " ".join(p.cmdline())]
        assert holder["pid"] in [p.pid for p in ranks] and len(ranks) == 2

        second = subprocess.run([sys.executable, "-m", "star_scale.cli", "train", *train_args(token_store, run)[3:]],
                                env=dist_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"star-scale: error: {run} is in use by another training job (host {holder['host']}, pid {holder['pid']}")
    finally:
        for proc in psutil.Process(job.pid).children(recursive=True) + [psutil.Process(job.pid)]:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:  # a rank that died with its sibling between the listing and the kill
                pass
        job.wait()
