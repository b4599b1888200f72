"""Who am I in a multi-process launch: rank, world size and rendezvous from the launcher's environment.

Three launchers are understood, in this order:

- torchrun and the deepspeed launcher both export RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT (the deepspeed launcher also passes
  ``--local_rank=N`` on the command line: ``strip_launcher_args`` removes it).
- srun: SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID; the master is the
  step's first node and the port is derived from the job id, so every task of a
  step computes the same rendezvous without talking to the others.  The values
  are exported as the torch variables so ``init_process_group("env://")`` works.

Only variables of a job *step* count (SLURM_STEP_*): a batch script's own shell
also carries SLURM_NTASKS, but it is one process, not the whole job.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (or the deepspeed launcher), "slurm" or "none"

    @property
    def distributed(self) -> bool:
        return self.launcher != "none"


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list -> names: 'gpu[01-03,7],cpu1' -> gpu01 gpu02 gpu03 gpu7 cpu1."""
    hosts, depth, token = [], 0, ""
    parts = []
    for ch in spec:  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    parts.append(token)
    for part in filter(None, parts):
        m = re.fullmatch(r"(.*?)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def _first_host(nodelist: str) -> str:
    try:  # scontrol knows every hostlist syntax; fall back to our parser without it
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_hostlist(nodelist)[0]


def detect(environ: Optional[dict] = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = int(env.get("MASTER_PORT", 0)) or 20000 + job % 20000  # same on every task of the job
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         env.get("MASTER_ADDR") or _first_host(nodelist), port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", 29500, "none")


def export_torch_env(le: LaunchEnv) -> None:
    """Make ``env://`` rendezvous work whatever the launcher was."""
    os.environ.update(RANK=str(le.rank), WORLD_SIZE=str(le.world_size), LOCAL_RANK=str(le.local_rank),
                      MASTER_ADDR=le.master_addr, MASTER_PORT=str(le.master_port))


def is_main_process() -> bool:
    return detect().rank == 0


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local-rank N`` (added by the deepspeed launcher), keeping LOCAL_RANK."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def cpu_summary(environ: Optional[dict] = None) -> str:
    """This process's CPUs as the scheduler bound them and its host, for the job log (a starved task shows up here)."""
    env = os.environ if environ is None else environ
    le = detect(env)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    slurm = f", SLURM_CPUS_PER_TASK={env['SLURM_CPUS_PER_TASK']}" if "SLURM_CPUS_PER_TASK" in env else ""
    return f"rank {le.rank}: {len(cpus)} cpus {_ranges(cpus)}{slurm}, host {socket.gethostname()}"


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for i, c in enumerate(ids):
        if start is None:
            start = c
        if i + 1 == len(ids) or ids[i + 1] != c + 1:
            out.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(out)
