"""The process layout: world = tensor-parallel (TP) x data-parallel (DP), groups from megatron.core.parallel_state.

Megatron orders ranks TP-first: ranks 0..tp-1 form one TP group (one model
replica), and DP groups stride across replicas.  ZeRO partitions over the DP
group; tensor-parallel shards never leave their TP group.

Device-dependent choices are made here once and logged: NCCL on CUDA, gloo on
CPU (DeepSpeed's CPU accelerator; its first init JIT-builds a shared-memory
comm op, cached under TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from star_scale.parallel.devices import export_device_rank
from star_scale.parallel.launch import detect, export_torch_env

log = logging.getLogger(__name__)


@dataclass
class Layout:
    rank: int
    world: int
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int
    device: torch.device
    tp_group: object
    dp_group: object

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_LAYOUT: Layout | None = None


def timeout_minutes() -> int:
    # The same variable DeepSpeed reads, so a dead rank fails every collective equally fast.
    return int(os.environ.get("DEEPSPEED_TIMEOUT", 30))


def _default_extensions_dir() -> None:
    """One JIT cache per virtualenv: a shared cache between venvs rebuilt the op on every launch."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def one_device_queue_for_tp(tp: int, environ: Optional[dict] = None) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 at TP > 1 unless set: megatron's column-parallel backward launches the
    input gradient's async all-reduce, then the weight-gradient GEMM, and relies on one hardware queue to run
    them in that order, so the all-reduce overlaps the GEMM; with several queues the GEMM can go first.  At
    TP = 1 CUDA's default stays: ZeRO-3's gather and reduce streams overlap compute through several queues.
    The driver reads it when the CUDA context is made: it must be set before ``set_device``."""
    env = os.environ if environ is None else environ
    if tp > 1:
        env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def init_layout(tp: int = 1, device: str = "auto", seed: int = 0) -> Layout:
    """Initialise torch.distributed (via DeepSpeed) and megatron's groups once per process; idempotent."""
    global _LAYOUT
    if _LAYOUT is not None:
        if _LAYOUT.tp != tp:
            raise RuntimeError(f"process groups already built for tp={_LAYOUT.tp}, asked for tp={tp}")
        return _LAYOUT
    one_device_queue_for_tp(tp)
    env = detect()
    export_torch_env(env)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(export_device_rank(env.local_rank, torch.cuda.device_count()))  # before DeepSpeed reads it
    _default_extensions_dir()
    import deepspeed
    from megatron.core import parallel_state

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=timeout_minutes()))
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"parallel.tp={tp} does not divide the world size {world}")
    if not parallel_state.model_parallel_is_initialized():
        # Extra gloo groups only matter for megatron's own checkpointing, which we do not use.
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 distributed_timeout_minutes=timeout_minutes(),
                                                 create_gloo_process_groups=False)
    if use_cuda:
        # Megatron's CUDA RNG tracker (dropout inside TP regions); fails on CPU, not needed there.
        from megatron.core import tensor_parallel
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _LAYOUT = Layout(
        rank=dist.get_rank(), world=world, tp=tp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp=parallel_state.get_data_parallel_world_size(), dp_rank=parallel_state.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )
    if _LAYOUT.is_main:
        log.info("parallel layout: world %d = tp %d x dp %d, backend %s, device %s",
                 world, tp, _LAYOUT.dp, dist.get_backend(), _LAYOUT.device.type)
    _watch_for_crash()
    atexit.register(lambda: shutdown(barrier=not _CRASHED))
    return _LAYOUT


_CRASHED = False


def _watch_for_crash() -> None:
    """Remember an uncaught exception: its exit must not wait at a barrier peers never reach."""
    previous = sys.excepthook

    def hook(*exc_info):
        global _CRASHED
        _CRASHED = True
        previous(*exc_info)
    sys.excepthook = hook


def shutdown(barrier: bool = True) -> None:
    """Destroy megatron's and torch's process groups (an exit with live gloo threads can abort rank 0)."""
    global _LAYOUT
    if not dist.is_initialized():
        return
    try:
        if barrier:
            if dist.get_backend() == "gloo":  # bounded wait: a dead peer must not hang the exit
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            else:
                dist.barrier()
    except Exception as e:  # a peer already died: still tear down locally
        log.warning("barrier at shutdown failed: %s", e)
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    _LAYOUT = None
