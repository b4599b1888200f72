"""`star-scale submit` against the real local Slurm cluster (cluster/local/)."""
import json
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from star_scale.train.tracking import default_uri
from tests.conftest import TINY

SUBMIT = [sys.executable, "-m", "star_scale.cli", "submit"]


def local_overrides(token_npz, out_dir, steps, tasks=2):
    return [*TINY, f"data.path={token_npz}", "data.global_batch=16", f"train.steps={steps}", "train.log_every=1",
            "train.ckpt_every=5", f"train.out_dir={out_dir}", "optimizer.lr_batch=null",
            "cluster.gpus_per_node=0", f"cluster.tasks_per_node={tasks}", "cluster.cpus_per_task=1",
            "cluster.time=00:10:00"]


def losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def submit(slurm, *args):
    out = slurm.run(*SUBMIT, *args)
    return out.stdout.split()[2].rstrip(":")  # "submitted job 12: path"


def test_submit_tiny_star_runs_2_tasks_trains_checkpoints_and_tracks(slurm, token_npz, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, "recipes/tiny-star.yaml", *local_overrides(token_npz, run_dir, steps=10))
    assert slurm.wait(job) == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()[-5000:]
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "DeepSpeed ZeRO-3" in log and "dp 2" in log  # 2 srun tasks formed one data-parallel job
    assert (run_dir / "checkpoints" / "step_00000010" / "meta.json").is_file()
    assert list(run_dir.glob("submit-*.sbatch"))
    client = MlflowClient(default_uri(run_dir))
    runs = client.search_runs([client.get_experiment_by_name("star-scale").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["slurm_job_id"] == job
    assert {"loss_mim", "loss_step", "loss_view"} <= set(runs[0].data.metrics)


def test_requeue_mid_training_resumes_to_the_same_losses(slurm, token_npz, tmp_path):
    steps = 40
    reference = tmp_path / "reference"
    job = submit(slurm, "recipes/tiny-star.yaml", *local_overrides(token_npz, reference, steps), "tracking.enabled=false")
    assert slurm.wait(job) == "COMPLETED", (reference / f"slurm-{job}.out").read_text()[-5000:]

    run_dir = tmp_path / "requeued"
    job = submit(slurm, "recipes/tiny-star.yaml", *local_overrides(token_npz, run_dir, steps), "tracking.enabled=false")
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 12):
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    slurm.run("scontrol", "requeue", job)
    slurm.start_requeued_now(job)
    assert slurm.wait(job) == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()[-5000:]
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "restart 1" in log and "received SIGTERM" in log
    assert losses(run_dir) == losses(reference)


@pytest.mark.parametrize("args,message", [
    (["recipes/missing.yaml"], "recipe 'recipes/missing.yaml': file not found"),
    (["recipes/3B-star.yaml", "parallel.tp=2", "cluster.gpus_per_node=3"], "parallel.tp=2 does not divide the 3 ranks per node"),
    (["recipes/tiny-ar.yaml", "--partition", "nope"], "cluster.partition='nope' does not exist on this cluster"),
])
def test_bad_submissions_fail_before_sbatch(slurm, args, message):
    out = slurm.run(*SUBMIT, *args, check=False)
    assert out.returncode == 2 and message in out.stderr
    assert slurm.run("squeue", "-h").stdout.strip() == ""
