"""A real tiny sweep through the local Slurm cluster, tracked on a real `mlflow server`, then fitted."""
import csv
import json
import sys
import time

from mlflow.tracking import MlflowClient
from PIL import Image

from star_scale.config import load_config
from star_scale.slurm.plan import count_params
from tests.conftest import TINY

SWEEP = [sys.executable, "-m", "star_scale.sweep"]
RECIPE = "recipes/sweeps/tiny.yaml"
CPU = ["cluster.gpus_per_node=0", "cluster.tasks_per_node=1", "cluster.cpus_per_task=1", "cluster.time=00:10:00"]


def wait_array(slurm, job: str, timeout: float = 900) -> dict:
    """{task id: final state} once no task of the array is pending or running."""
    deadline = time.monotonic() + timeout
    while slurm.run("squeue", "-h", "-j", job, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"array {job} still running after {timeout} s"
        time.sleep(1)
    states = {}
    for line in slurm.run("scontrol", "show", "job", job, "-o").stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        states[fields.get("ArrayTaskId")] = fields["JobState"]
    return states


def test_tiny_sweep_runs_as_one_array_and_fits(slurm, mlflow_server, token_npz, tmp_path):
    out = tmp_path / "sweep"
    # The repo's tiny sweep on the test tokens (4x4 grid, batch 16 -> 256 tokens per step): 2 sizes x 2 budgets.
    sets = ["--set", "grid.sizes.w64=null", "--set", "grid.tokens=[5120, 10240]",
            "--set", f"tracking.uri={mlflow_server.uri}", "--set", "tracking.experiment=tiny-sweep-test"]
    overrides = [*TINY, f"data.path={token_npz}", "data.global_batch=16", *CPU]
    submitted = slurm.run(*SWEEP, "submit", RECIPE, *overrides, *sets, "--out", str(out)).stdout
    job = submitted.split("submitted array job ")[1].split(":")[0]
    assert "4 tasks" in submitted
    states = wait_array(slurm, job)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((out / "logs").glob("*.out")))
    assert states == {str(i): "COMPLETED" for i in range(4)}, logs

    state = json.loads((out / "sweep.json").read_text())
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("tiny-sweep-test")
    assert state["experiment_id"] == exp.experiment_id and state["jobs"][0]["job"] == job
    runs = client.search_runs([exp.experiment_id], "tags.sweep = 'tiny'")
    assert sorted(r.data.tags["sweep_run"] for r in runs) == ["w16-D1.02e4", "w16-D5120", "w32-D1.02e4", "w32-D5120"]
    assert all(r.info.status == "FINISHED" and r.data.tags["slurm_array_job_id"] == job for r in runs)

    fitted = slurm.run(*SWEEP, "fit", str(out), "--bootstrap", "20")
    fit_dir = out / "fit"
    assert "## Runs (4)" in fitted.stdout and (fit_dir / "fit.md").read_text() in fitted.stdout
    rows = {row["run"]: row for row in csv.DictReader((fit_dir / "runs.csv").open())}
    for run in state["runs"]:
        row = rows[run["label"]]
        cfg = load_config(run["args"][0], run["args"][1:])
        assert int(row["N"]) == count_params(cfg)[0] == run["n_params"]
        assert int(row["D"]) == run["steps"] * 256 == run["tokens"]  # tokens_seen at the end
        assert 0 < float(row["loss"]) < 10
    assert json.loads((fit_dir / "fit.json").read_text())["fit"] is not None  # 4 runs: fitted, with a warning
    for png in ("loss_vs_compute.png", "compute_optimal.png"):
        with Image.open(fit_dir / png) as img:
            assert img.format == "PNG"


def test_bad_partition_fails_before_sbatch(slurm, token_npz, tmp_path):
    out = slurm.run(*SWEEP, "submit", RECIPE, *TINY, f"data.path={token_npz}", *CPU, "--partition", "nope",
                    "--out", str(tmp_path / "sweep"), check=False)
    assert out.returncode == 2 and "cluster.partition='nope' does not exist on this cluster" in out.stderr
    assert slurm.run("squeue", "-h").stdout.strip() == ""
    assert not (tmp_path / "sweep").exists()
