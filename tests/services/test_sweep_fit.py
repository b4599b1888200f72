"""`star-scale sweep fit` on synthetic runs from a known law, read back from mlflow: the sweep's default
local store (a sqlite file in the sweep folder) and a real `mlflow server` on 127.0.0.1."""
import csv
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from star_scale import sweep as sw
from star_scale.config import load_config
from star_scale.sweep import scaling

ROOT = Path(__file__).resolve().parents[2]
LAW = dict(E=1.69, A=406.4, a=0.34, B=410.7, b=0.28)
# GPT sizes at ImageNet scale (4.8M .. 775M parameters) x 6 token budgets: planned only, never trained.
SPEC = f"""
base: {ROOT / 'recipes' / 'B-ar.yaml'}
grid:
  sizes:
    s128: {{model.layers: 2, model.heads: 2, model.width: 128}}
    s256: {{model.layers: 4, model.heads: 4, model.width: 256}}
    s512: {{model.layers: 8, model.heads: 8, model.width: 512}}
    B: {{model.preset: B}}
    L: {{model.preset: L}}
    XL: {{model.preset: XL}}
  tokens: [1.0e8, 4.0e8, 1.6e9, 6.4e9, 2.5e10, 1.0e11]
fit: {{bootstrap: 30}}
"""


def log_run(client, experiment_id, cfg, tags, steps, tokens_per_step, loss_at, status="FINISHED"):
    """One run as the trainer's Tracker writes it: flattened config params (strings), loss + tokens_seen."""
    run = client.create_run(experiment_id, run_name=cfg.name, tags=tags)
    params = [Param(k, str(v)) for k, v in cfg.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    ts = int(time.time() * 1000)
    metrics = []
    for j in range(1, 11):  # 10 logged points along the run
        step = max(1, round(steps * j / 10))
        metrics += [Metric("loss", float(loss_at(step * tokens_per_step)), ts, step),
                    Metric("tokens_seen", float(step * tokens_per_step), ts, step)]
    client.log_batch(run.info.run_id, metrics=metrics)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


@pytest.mark.parametrize("store", ["local", "server"])
def test_fit_recovers_known_exponents_from_mlflow(store, request, tmp_path):
    path = tmp_path / "synthetic.yaml"
    path.write_text(SPEC)
    sets = [] if store == "local" else [
        f"tracking.uri={request.getfixturevalue('mlflow_server').uri}", f"tracking.experiment=synthetic-{uuid.uuid4().hex[:8]}"]
    sweep = sw.load_sweep(path, sets=sets, out=str(tmp_path / "sweep"))
    if store == "local":
        assert sweep.uri == f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}"
    sw.write_plan(sweep)
    experiment_id = sw.ensure_experiment(sweep.uri, sweep.experiment, sweep.dir)
    client = MlflowClient(sweep.uri)

    rng = np.random.default_rng(0)
    law = scaling.LawFit(**LAW)
    stale = sweep.runs[0]
    for run in sweep.runs:
        cfg = load_config(run.args[0], run.args[1:])
        tags = {"sweep": sweep.name, "sweep_run": run.label, "sweep_size": run.size}
        if run is stale:  # an older attempt of the same run, superseded by the resubmission below
            log_run(client, experiment_id, cfg, tags, run.steps, run.tokens_per_step, lambda d: 99.0)
        noise = float(np.exp(rng.normal(0, 0.003)))
        log_run(client, experiment_id, cfg, tags, run.steps, run.tokens_per_step,
                lambda d, n=run.n_params, z=noise: law.predict(n, d) * z)
    cfg = load_config(stale.args[0], stale.args[1:])
    log_run(client, experiment_id, cfg, {"sweep": sweep.name, "sweep_run": "unfinished", "sweep_size": "x"},
            100, 4096, lambda d: 0.1, status="RUNNING")
    log_run(client, experiment_id, cfg, {"sweep": "another-sweep", "sweep_run": "other", "sweep_size": "x"},
            100, 4096, lambda d: 0.1)

    assert sw.main(["fit", str(sweep.dir)]) == 0
    out = sweep.dir / "fit"
    summary = json.loads((out / "fit.json").read_text())
    fit = summary["fit"]
    assert abs(fit["a"] / LAW["a"] - 1) < 0.05 and abs(fit["b"] / LAW["b"] - 1) < 0.05, fit
    assert abs(fit["n_exponent"] / law.n_exponent - 1) < 0.05 and abs(fit["d_exponent"] / law.d_exponent - 1) < 0.05
    params = {row["parameter"]: row for row in summary["parameters"]}
    assert params["a"]["ci_low"] < params["a"]["estimate"] < params["a"]["ci_high"]
    assert summary["k"] == pytest.approx(6.0) and not summary["warnings"]

    rows = list(csv.DictReader((out / "runs.csv").open()))
    planned = {r.label: r for r in sweep.runs}
    assert sorted(row["run"] for row in rows) == sorted(planned)  # unfinished and other sweeps left out
    for row in rows:
        assert int(row["N"]) == planned[row["run"]].n_params and int(row["D"]) == planned[row["run"]].tokens
        assert float(row["loss"]) < 50  # the newer attempt of the duplicated run
    assert {row["parameter"] for row in csv.DictReader((out / "fit.csv").open())} >= {"E", "A", "a", "B", "b"}
    frontier = list(csv.DictReader((out / "frontier.csv").open()))
    for row in frontier:
        assert float(row["N_low"]) <= float(row["N_opt"]) <= float(row["N_high"])
        assert float(row["N_opt"]) == pytest.approx(law.n_opt(float(row["C"])), rel=0.3)
    md = (out / "fit.md").read_text()
    assert "N_opt exponent b/(a+b)" in md and "| B-D1e11 |" in md
    for png in ("loss_vs_compute.png", "compute_optimal.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.size[0] > 500
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries
