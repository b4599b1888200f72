"""The sbatch script on the real local Slurm (task/affinity binds CPUs): CPUs per task, and a time-limit
signal whose checkpoint is too slow still ends in a requeue that resumes the run."""
import json
import os
import re
import subprocess
import time

import pytest

from tests.services.test_slurm_submit import SUBMIT, local_overrides


def submit(slurm, *args, env=None):
    out = subprocess.run([*SUBMIT, *args], capture_output=True, text=True, env={**slurm.env, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[2].rstrip(":")


@pytest.mark.parametrize("tasks,cpus", [(1, 2), (2, 1)])
def test_each_task_runs_on_its_cpus(slurm, token_npz, tmp_path, tasks, cpus):
    run_dir = tmp_path / "run"
    overrides = local_overrides(token_npz, run_dir, steps=2, tasks=tasks)
    job = submit(slurm, "recipes/tiny-ar.yaml", *overrides, f"cluster.cpus_per_task={cpus}",
                 "tracking.enabled=false")
    assert slurm.wait(job) == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()[-5000:]
    log = (run_dir / f"slurm-{job}.out").read_text()
    seen = dict(re.findall(rf"rank (\d+): {cpus} cpus ([\d,-]+), SLURM_CPUS_PER_TASK={cpus}\b", log))
    assert sorted(seen) == [str(r) for r in range(tasks)], log[-3000:]
    assert len(set(seen.values())) == tasks  # bound to different CPUs, not all on one


def test_slow_save_at_the_time_limit_still_requeues_and_resumes(slurm, token_npz, tmp_path):
    run_dir = tmp_path / "run"
    steps = 60
    overrides = [*local_overrides(token_npz, run_dir, steps, tasks=1), "train.ckpt_every=10",
                 "cluster.signal_seconds=30", "tracking.enabled=false"]
    # The signal-triggered save hangs far past the script's wait (about 10 s).
    job = submit(slurm, "recipes/tiny-ar.yaml", *overrides, env={"STAR_SCALE_FAULT_SLOW_SAVE": "600"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 15):
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@N does at the limit
    slurm.start_requeued_now(job)
    assert slurm.wait(job, timeout=600) == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()[-5000:]
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert re.search(r"the checkpoint did not finish in \d+ s; requeueing anyway", log), log[-3000:]
    assert "restart 1" in log and "resumed from" in log
    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # nothing lost, nothing doubled
    assert not os.environ.get("STAR_SCALE_FAULT_SLOW_SAVE")
