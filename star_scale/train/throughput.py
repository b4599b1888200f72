"""Tokens/s and model FLOPs utilisation (MFU) against the device's peak."""
from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s (no sparsity) by GPU name substring.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


@functools.lru_cache(maxsize=None)
def peak_flops(device_type: str, device_name: str = "") -> float:
    """Peak FLOP/s: the spec sheet for known GPUs, a measured fp32 matmul rate otherwise."""
    for key, value in GPU_PEAK_BF16.items():
        if key in device_name:
            return value
    n = 512
    g = torch.Generator().manual_seed(0)  # private: must not move the training RNG
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b  # warm up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        a @ b
        reps += 1
    measured = 2 * n**3 * reps / (time.perf_counter() - t0)
    log.info("peak FLOP/s for MFU on %s: measured fp32 matmul %.3g", device_name or device_type, measured)
    return measured


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Meter:
    """Rate of tokens (and MFU) since the last ``read``."""

    def __init__(self, flops_per_token: float, device: torch.device, world_size: int = 1):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device.type, device_name(device)) * world_size
        self.tokens, self.t0 = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.tokens / dt
        self.tokens, self.t0 = 0, time.perf_counter()
        return {"tokens_per_s": rate, "mfu": rate * self.flops_per_token / self.peak}


def memory_stats(device: torch.device) -> dict:
    """Peak memory in GiB: CUDA allocator peak on GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return {"memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is KiB on Linux
