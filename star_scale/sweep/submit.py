"""`sweep submit`: check the runs, create the mlflow experiment once, render the array script, sbatch it."""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from star_scale.config import Config, ConfigError
from star_scale.sweep.common import SweepError, _atomic_write
from star_scale.sweep.spec import Sweep, read_state, write_plan

TEMPLATE = Path(__file__).resolve().parents[2] / "cluster" / "templates" / "sweep.sbatch"


def check_submission(sweep: Sweep, query_slurm: bool = True) -> list[Config]:
    """Everything sbatch would not catch: cluster layout, one resource shape for the array, data present."""
    from star_scale.slurm.submit import check_cluster

    cfgs = sweep.configs()
    first = cfgs[0].cluster
    for run, cfg in zip(sweep.runs, cfgs):
        for f in dataclasses.fields(first):
            if getattr(cfg.cluster, f.name) != getattr(first, f.name):
                raise SweepError(f"{sweep.file}: cluster.{f.name} differs between runs {sweep.runs[0].label} "
                                 f"({getattr(first, f.name)!r}) and {run.label} ({getattr(cfg.cluster, f.name)!r}): "
                                 f"one Slurm array has one resource shape")
        try:
            check_cluster(cfg, query_slurm=query_slurm and run.index == 0)
        except ConfigError as e:
            raise SweepError(f"{sweep.file}: run {run.label}: {e}") from None
        if not Path(cfg.data.path).exists():
            raise SweepError(f"{sweep.file}: run {run.label}: data.path={cfg.data.path!r}: not found "
                             f"(relative to {Path.cwd()}, where the tasks run)")
    return cfgs


def ensure_experiment(uri: str, name: str, sweep_dir: Path) -> str:
    """Create (or find) the sweep's experiment once, before any task starts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise SweepError(f"mlflow experiment {name!r} at {uri} is deleted: restore it or set the sweep's "
                             "tracking.experiment to another name")
        return exp.experiment_id
    local = not uri.startswith(("http://", "https://", "databricks"))
    artifacts = (sweep_dir / "artifacts").resolve().as_uri() if local else None
    return client.create_experiment(name, artifact_location=artifacts)


def render(sweep: Sweep, cfg: Config, experiment_id: str) -> str:
    """The array script: resources from the runs' (shared) cluster section, task i = run i."""
    from star_scale.slurm.submit import fill, sbatch_options

    c = cfg.cluster
    array = f"0-{len(sweep.runs) - 1}" + (f"%{sweep.max_parallel}" if sweep.max_parallel else "")
    return fill(TEMPLATE, {
        "JOB_NAME": f"sweep-{sweep.name}", "ARRAY": array, "NODES": c.nodes, "TASKS_PER_NODE": c.ranks_per_node(),
        "CPUS_PER_TASK": c.cpus_per_task, "TIME": c.time, "SIGNAL_SECONDS": c.signal_seconds,
        "EXTRA_SBATCH": "\n".join(sbatch_options(c)), "EXPERIMENT_ID": shlex.quote(experiment_id),
        "WORKDIR": shlex.quote(str(Path.cwd())), "PYTHON": shlex.quote(sys.executable),
        "SWEEP_DIR": sweep.dir, "SWEEP_DIR_Q": shlex.quote(str(sweep.dir)), "SWEEP_NAME": sweep.name,
    })


def submit_sweep(sweep: Sweep, dry_run: bool = False) -> Optional[str]:
    from star_scale.slurm.submit import sbatch

    cfgs = check_submission(sweep, query_slurm=not dry_run)
    if dry_run:
        print(render(sweep, cfgs[0], "<created at submission>"))
        return None
    write_plan(sweep)
    experiment_id = ensure_experiment(sweep.uri, sweep.experiment, sweep.dir)
    script = render(sweep, cfgs[0], experiment_id)
    path = sweep.dir / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    _atomic_write(path, script)
    job = sbatch(path)
    state = read_state(sweep.dir)
    state["experiment_id"] = experiment_id
    state.setdefault("jobs", []).append({"job": job, "script": str(path), "time": time.time()})
    _atomic_write(sweep.dir / "sweep.json", json.dumps(state, indent=1))
    _atomic_write(sweep.dir / "slurm_job_id", job + "\n")
    return job
