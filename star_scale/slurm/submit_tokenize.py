"""`star-scale submit-tokenize`: the offline tokenizer as a Slurm array, then a verify job.

The store is created here first (`--prepare-only`: fits the patch tokenizer
once, fixes the row order and the shards), so array tasks never race to
create it; each task then tokenizes its share of the shards, and a job that
depends on all of them (afterok) verifies the store.  Options this command
does not know are passed to the tokenize job (`star-scale tokenize --help`).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from star_scale.config import ConfigError
from star_scale.slurm.submit import TEMPLATES, add_cluster_flags, fill, partitions, sbatch, sbatch_options


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="star-scale submit-tokenize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="ImageNet-layout folder or list file")
    ap.add_argument("out", help="the Zarr token store to write")
    ap.add_argument("--tasks", type=int, default=8, help="array tasks (default 8)")
    ap.add_argument("--cpus-per-task", type=int, default=4, help="CPUs (= tokenizer worker processes) per task")
    ap.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per task (VQ-16 on GPU: 1)")
    add_cluster_flags(ap)
    args, job_args = ap.parse_known_args(argv)
    if args.tasks < 1:
        raise ConfigError(f"--tasks {args.tasks}: expected at least 1")
    cluster = SimpleNamespace(gpus_per_node=args.gpus_per_task, partition=args.partition, account=args.account,
                              constraint=args.constraint, extra_sbatch=[])
    if not args.dry_run:
        names, default = partitions()
        if args.partition is None and default is None:
            raise ConfigError(f"--partition is not set and the cluster has no default partition; choose one of {names}")
        if args.partition is not None and args.partition not in names:
            raise ConfigError(f"--partition {args.partition!r} does not exist on this cluster; expected one of {names}")

    out = Path(args.out).resolve()
    log_dir = out.parent / f"{out.name}.slurm"
    python = shlex.quote(sys.executable)
    common = {"JOB_NAME": f"tokenize-{out.stem}", "TIME": args.time or "24:00:00", "LOG_DIR": log_dir,
              "EXTRA_SBATCH": "\n".join(sbatch_options(cluster)), "WORKDIR": shlex.quote(str(Path.cwd())),
              "PYTHON": python}
    array = fill(TEMPLATES / "tokenize.sbatch", {
        **common, "LAST_TASK": args.tasks - 1, "NUM_TASKS": args.tasks, "CPUS_PER_TASK": args.cpus_per_task,
        "ARGS": " ".join(shlex.quote(a) for a in [args.source, str(out), *job_args])})
    verify = fill(TEMPLATES / "verify.sbatch", {**common, "OUT": shlex.quote(str(out))})
    if args.dry_run:
        print(array)
        print(verify)
        return 0

    # Create the store once, here: the tasks only fill their shards.
    subprocess.run([sys.executable, "-m", "tokenize_data", args.source, str(out), *job_args, "--prepare-only"],
                   check=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    array_path, verify_path = log_dir / f"tokenize-{stamp}.sbatch", log_dir / f"verify-{stamp}.sbatch"
    array_path.write_text(array)
    verify_path.write_text(verify)
    array_job = sbatch(array_path)
    verify_job = sbatch(verify_path, [f"--dependency=afterok:{array_job}"])
    print(f"submitted tokenization array {array_job} ({args.tasks} tasks) and verify job {verify_job}: {log_dir}")
    return 0
