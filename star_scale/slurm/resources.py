"""What a training job asks Slurm for beyond GPUs: host memory (`--mem`) and the time-limit signal's window.

Both are estimates from the parameter count, like `star-scale plan`:

- host memory per node: each rank builds the full fp32 student and its teacher
  copy on the host before sharding (8 bytes/param), holds its own shard of the
  fp32 optimizer state (12 bytes/param over the ranks) and, with
  ``train.async_save``, a host copy of its checkpoint share while it is written;
  plus a constant per rank for the interpreter, CUDA/NCCL host buffers and the
  loader. On a CPU cluster training runs in host memory: the plan itself.
- the save window: one checkpoint writes each rank's shards only (fp32 masters
  and AdamW moments: 12 bytes/param over the ranks, plus the teacher's 4), and
  each rank reads its own files back once for their sha256, all ranks at once.
  A node's bytes over ``cluster.ckpt_write_gbs``, plus one rank's share over
  the hash rate, times a safety margin, must fit in ``cluster.signal_seconds``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from star_scale.config import Config, ConfigError
from star_scale.slurm.plan import GIB, count_params, estimate

RANK_OVERHEAD_GIB = 6.0  # interpreter + torch + CUDA context host side + NCCL buffers + loader prefetch
CPU_RANK_OVERHEAD_GIB = 1.0  # the same without CUDA (local and CPU clusters)
HASH_GBS = 0.8  # sha256 of one core, GB/s: the checkpoint is hashed after it is written
SAVE_MARGIN = 1.5  # filesystems under load are slower than their quiet rate
MIN_SIGNAL_SECONDS = 30
MEM_RE = re.compile(r"^(auto|node|none|\d+[KMGT]?)$")


def host_bytes_per_node(cfg: Config) -> float:
    c = cfg.cluster
    n, _ = count_params(cfg)
    ranks, world = c.ranks_per_node(), c.world_size()
    star = cfg.objective.name == "star"
    if not c.gpus_per_node:  # CPU cluster: the model trains in host memory
        per_rank = estimate(cfg, world, gpu=False).total + CPU_RANK_OVERHEAD_GIB * GIB
        return ranks * per_rank
    share = checkpoint_bytes_per_rank(cfg) if cfg.train.async_save else 0
    per_rank = (8 if star else 4) * n + 12 * n / world + share + RANK_OVERHEAD_GIB * GIB
    return ranks * per_rank


def mem_line(cfg: Config) -> str:
    """The `#SBATCH --mem` line from cluster.mem: the estimate rounded up to GiB, the whole node, a size, or none."""
    mem = str(cfg.cluster.mem)
    if not MEM_RE.match(mem):
        raise ConfigError(f"cluster.mem={mem!r}: expected auto, node (all of its memory), none or a size such as 200G")
    if mem == "none":
        return ""
    value = {"auto": f"{math.ceil(host_bytes_per_node(cfg) / GIB)}G", "node": "0"}.get(mem, mem)
    return f"#SBATCH --mem={value}"


def checkpoint_bytes_per_rank(cfg: Config) -> float:
    """Bytes of one rank's shards: its share of the fp32 masters, AdamW moments and teacher."""
    n, _ = count_params(cfg)
    teacher = 4 if cfg.objective.name == "star" else 0
    return (12 + teacher) * n / cfg.cluster.world_size()


def checkpoint_bytes_busiest_node(cfg: Config) -> float:
    """Bytes one checkpoint writes on one node (its ranks' shards; every node writes the same)."""
    return cfg.cluster.ranks_per_node() * checkpoint_bytes_per_rank(cfg)


@dataclass(frozen=True)
class SaveWindow:
    bytes: float
    seconds: float  # the estimate with its margin
    signal_seconds: int  # what the job is submitted with
    save_wait: int  # how long the batch script lets the save run before it requeues regardless
    note: str  # non-empty when signal_seconds was raised


def save_window(cfg: Config) -> SaveWindow:
    c = cfg.cluster
    if c.ckpt_write_gbs <= 0:
        raise ConfigError(f"cluster.ckpt_write_gbs={c.ckpt_write_gbs}: expected the write bandwidth per node "
                          "in GB/s, > 0")
    nbytes = checkpoint_bytes_busiest_node(cfg)
    seconds = SAVE_MARGIN * (nbytes / (c.ckpt_write_gbs * 1e9) + checkpoint_bytes_per_rank(cfg) / (HASH_GBS * 1e9))
    needed = max(MIN_SIGNAL_SECONDS, math.ceil(seconds) + 30)  # +30 s: the step in flight, requeue itself
    limit = time_limit_seconds(c.time)
    signal_seconds, note = c.signal_seconds, ""
    if signal_seconds < needed:
        note = (f"cluster.signal_seconds raised from {signal_seconds} to {needed}: a checkpoint writes "
                f"{nbytes / 1e9:.1f} GB per node, about {seconds:.0f} s at cluster.ckpt_write_gbs="
                f"{c.ckpt_write_gbs:g} with x{SAVE_MARGIN:g} margin")
        signal_seconds = needed
    if limit is not None and needed > limit / 2:
        raise ConfigError(f"cluster.time={c.time}: a checkpoint needs about {needed} s before the limit "
                          f"({nbytes / 1e9:.1f} GB at cluster.ckpt_write_gbs={c.ckpt_write_gbs:g}), more than half "
                          "of the job; expected a longer cluster.time or a faster filesystem")
    return SaveWindow(nbytes, seconds, signal_seconds, max(1, signal_seconds - 20), note)


def time_limit_seconds(spec: str) -> int | None:
    """Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; None for INFINITE/UNLIMITED."""
    s = str(spec).strip()
    if s.upper() in ("INFINITE", "UNLIMITED"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ConfigError(f"cluster.time={spec!r}: expected a Slurm time such as 24:00:00 or 2-00:00:00")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    if b is not None:  # MM:SS
        return a * 60 + b
    return a * 60  # MM
