"""Tracking against a real `mlflow server` on 127.0.0.1, including an outage mid-run."""
import json
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from tests.conftest import TINY


def train_cmd(token_npz, out_dir, uri, steps):
    return [
        sys.executable, "-m", "star_scale.cli", "train", *TINY,
        f"data.path={token_npz}", "data.global_batch=16", f"train.steps={steps}", "train.log_every=1",
        f"train.ckpt_every={steps}", f"train.out_dir={out_dir}", f"tracking.uri={uri}",
        "tracking.experiment=outage", "optimizer.lr_batch=null"]


def test_server_killed_mid_run_loses_no_metrics(mlflow_server, token_npz, tmp_path):
    steps = 300
    proc = subprocess.Popen(train_cmd(token_npz, tmp_path / "run", mlflow_server.uri, steps),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    # Wait until training is under way and mlflow has its run, then take the server away.
    client = MlflowClient(mlflow_server.uri)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name("outage")
        if exp and client.search_runs([exp.experiment_id]) and metrics.exists() and metrics.read_text().count("\n") > 5:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    mlflow_server.stop()
    at_kill = metrics.read_text().count("\n")
    time.sleep(3)
    assert metrics.read_text().count("\n") > at_kill, "training stalled while the server was down"
    mlflow_server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "unreachable" in err and "reachable again" in err

    run_id = json.loads(out.strip().splitlines()[-1])["mlflow_run_id"]
    history = MlflowClient(mlflow_server.uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    assert MlflowClient(mlflow_server.uri).get_run(run_id).info.status == "FINISHED"
