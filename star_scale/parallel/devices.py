"""Which CUDA device a rank uses, when the launcher may have bound GPUs per task.

torchrun (and srun without binding) show every GPU of the node to every rank:
rank LOCAL_RANK takes device LOCAL_RANK.  Slurm with ``--gpus-per-task=1`` or
``--gpu-bind`` shows each task only its own GPUs, so every rank sees device 0;
``set_device(LOCAL_RANK)`` (DeepSpeed's default) then fails with an invalid
device ordinal on every rank but the first.  The rule: fewer visible devices
than ranks on this node means per-task binding, so take the task's first
device.  With more than one device per task (``--gpus-per-task=2``,
``--gpu-bind=closest``: a socket's GPUs shared by that socket's tasks) the
rank takes ``local_rank % devices``, so the tasks sharing a set spread over
it (this assumes Slurm's block placement of tasks on sockets).  The engine,
DeepSpeed (``device_rank``, and LOCAL_RANK, which it reads by itself),
sampling and the RNG state all use the index chosen here.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Optional


def local_world_size(environ: Optional[dict] = None) -> Optional[int]:
    """Ranks on this node, from torchrun's LOCAL_WORLD_SIZE or Slurm's step layout; None if unknown."""
    env = os.environ if environ is None else environ
    if env.get("LOCAL_WORLD_SIZE"):
        return int(env["LOCAL_WORLD_SIZE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:  # e.g. "8(x2)" or "4,3": the first node's count (nodes are filled alike)
        m = re.match(r"(\d+)", spec)
        return int(m.group(1)) if m else None
    return None


def cuda_device_index(local_rank: int, device_count: int, local_world: Optional[int] = None) -> int:
    if device_count < 1:
        raise RuntimeError(f"local rank {local_rank} asked for a CUDA device, but none is visible "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})")
    if local_world is not None and device_count < local_world:
        return local_rank % device_count  # per-task binding: a device of the task's own set
    if local_rank < device_count:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} but only {device_count} CUDA devices visible and "
                       f"{local_world or 'an unknown number of'} ranks on this node: expected one device per rank "
                       "(or Slurm's --gpus-per-task / --gpu-bind)")


def rank_device_index(local_rank: int, environ: Optional[dict] = None) -> int:
    import torch

    return cuda_device_index(local_rank, torch.cuda.device_count(), local_world_size(environ))


def export_device_rank(local_rank: int, device_count: int, environ: Optional[dict] = None) -> int:
    """This rank's device index, also exported as LOCAL_RANK: DeepSpeed reads LOCAL_RANK itself
    (init_process_group's ``device_id``, zero.Init's device), so under per-task binding the node-local
    rank would name a device the task cannot see.  The index is a fixed point of the rule, so a later
    ``detect()`` maps it to the same device."""
    env = os.environ if environ is None else environ
    index = cuda_device_index(local_rank, device_count, local_world_size(env))
    env["LOCAL_RANK"] = str(index)
    return index


def deepspeed_args(device) -> argparse.Namespace:
    """``deepspeed.initialize(args=...)``: its ``device_rank`` replaces the LOCAL_RANK it would set_device
    (also passed on CPU, where DeepSpeed's accelerator ignores the index, so the CPU tests run this path)."""
    return argparse.Namespace(device_rank=device.index or 0 if device.type == "cuda" else 0)
