"""`star-scale submit`: render a recipe into an sbatch script, check it, and call sbatch.

Everything that can be wrong is checked before sbatch sees the script: the
recipe loads and validates for the cluster's world size, TP divides the ranks
per node (a TP group spans nodes only with cluster.tp_across_nodes), and the
partition exists.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from star_scale.config import Config, ConfigError, load_config, save_config
from star_scale.slurm.resources import mem_line, save_window
from star_scale.trust.credentials import strip_credentials

TEMPLATES = Path(__file__).resolve().parents[2] / "cluster" / "templates"


def partitions() -> tuple[list[str], Optional[str]]:
    """(partition names, the default one) as sinfo reports them."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise ConfigError("sinfo not found: is this a Slurm login node? (use --dry-run to only render the script)") from None
    if out.returncode:
        raise ConfigError(f"sinfo failed: {out.stderr.strip()}")
    names, default = [], None
    for name in out.stdout.split():
        if name.endswith("*"):
            name = name[:-1]
            default = name
        names.append(name)
    return names, default


def check_cluster(cfg: Config, query_slurm: bool = True) -> None:
    c, p = cfg.cluster, cfg.parallel
    if c.nodes < 1 or c.ranks_per_node() < 1:
        raise ConfigError(f"cluster.nodes={c.nodes}, ranks per node {c.ranks_per_node()}: expected at least one of each "
                          "(set cluster.gpus_per_node, or cluster.tasks_per_node on a CPU cluster)")
    if c.ranks_per_node() % p.tp and not c.tp_across_nodes:
        raise ConfigError(f"parallel.tp={p.tp} does not divide the {c.ranks_per_node()} ranks per node "
                          f"(cluster.gpus_per_node={c.gpus_per_node}): a tensor-parallel group must sit inside one node "
                          "(or set cluster.tp_across_nodes=true)")
    cfg.validate(c.world_size())
    mem_line(cfg), save_window(cfg)  # their errors name the cluster keys, before sbatch
    if query_slurm:
        names, default = partitions()
        if c.partition is None and default is None:
            raise ConfigError(f"cluster.partition is not set and the cluster has no default partition; "
                              f"choose one of {names}")
        if c.partition is not None and c.partition not in names:
            raise ConfigError(f"cluster.partition={c.partition!r} does not exist on this cluster; expected one of {names}")


def create_experiment(cfg: Config) -> str:
    """Create (or find) the mlflow experiment once, here, before any task starts."""
    if not cfg.tracking.enabled:
        return ""
    if cfg.tracking.experiment_id:
        return cfg.tracking.experiment_id
    from mlflow.tracking import MlflowClient

    from star_scale.train.tracking import default_uri

    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(cfg.tracking.uri or default_uri(run_dir))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)


def sbatch_options(c) -> list[str]:
    """#SBATCH lines for the optional cluster settings (GPUs, partition, account, constraint, extras)."""
    lines = [f"#SBATCH --gpus-per-node={c.gpus_per_node}"] if c.gpus_per_node else []
    for flag, value in (("partition", c.partition), ("account", c.account), ("constraint", c.constraint)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    return lines + [f"#SBATCH {opt}" for opt in c.extra_sbatch]


def fill(template: Path, values: dict) -> str:
    """Replace each @KEY@ of a cluster/templates file; a placeholder left over is a bug in the template."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    left = [w for w in text.split("@") if w.isupper() and w.replace("_", "").isalpha() and f"@{w}@" in text]
    if left:
        raise ValueError(f"{template}: placeholders without a value: {sorted(set(left))}")
    return text


def render(cfg: Config, train_args: list[str], experiment_id: str, template: Path = TEMPLATES / "train.sbatch") -> str:
    c = cfg.cluster
    window = save_window(cfg)
    return fill(template, {
        "JOB_NAME": cfg.name, "NODES": c.nodes, "TASKS_PER_NODE": c.ranks_per_node(), "CPUS_PER_TASK": c.cpus_per_task,
        "TIME": c.time, "RUN_DIR": cfg.run_dir().resolve(), "SIGNAL_SECONDS": window.signal_seconds,
        "SAVE_WAIT": window.save_wait, "MEM_LINE": mem_line(cfg), "TP": cfg.parallel.tp,
        "STEP_START_TIMEOUT": c.step_start_timeout,
        "EXTRA_SBATCH": "\n".join(sbatch_options(c)), "EXPERIMENT_ID": shlex.quote(experiment_id),
        "WORKDIR": shlex.quote(str(Path.cwd())), "PYTHON": shlex.quote(sys.executable),
        # The script lands in the run folder: credentials travel in the job's environment, not here.
        "ARGS": " ".join(shlex.quote(strip_credentials(a)) for a in train_args),
    })


def sbatch(script: Path, extra: list[str] = ()) -> str:
    out = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"sbatch {script} failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def cluster_overrides(args) -> list[str]:
    flags = {"partition": args.partition, "account": args.account, "time": args.time, "nodes": args.nodes,
             "constraint": args.constraint}
    return [f"cluster.{k}={v}" for k, v in flags.items() if v is not None]


def add_cluster_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--partition", help="Slurm partition (default: the recipe's cluster.partition, else the cluster default)")
    ap.add_argument("--account", help="Slurm account")
    ap.add_argument("--time", help="time limit, e.g. 24:00:00")
    ap.add_argument("--nodes", type=int, help="number of nodes")
    ap.add_argument("--constraint", help="node features, e.g. h100")
    ap.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="star-scale submit", description="Render a recipe into an sbatch script under "
                                 "the run folder and submit it: one task per GPU via srun, USR1-triggered checkpoint "
                                 "+ requeue, the mlflow experiment created up front.")
    ap.add_argument("recipe", help="YAML recipe")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value (also passed to the training tasks)")
    add_cluster_flags(ap)
    args = ap.parse_args(argv)

    overrides = [*args.overrides, *cluster_overrides(args)]
    cfg = load_config(args.recipe, overrides)
    check_cluster(cfg, query_slurm=not args.dry_run)
    note = save_window(cfg).note
    if note:
        print(f"star-scale submit: {note}", file=sys.stderr)
    experiment_id = "" if args.dry_run else create_experiment(cfg)
    script = render(cfg, [args.recipe, *overrides], experiment_id)
    if args.dry_run:
        print(script)
        return 0
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    path = run_dir / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    job = sbatch(path)
    (run_dir / "slurm_job_id").write_text(job + "\n")
    print(f"submitted job {job}: {path}")
    return 0
