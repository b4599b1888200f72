"""Tokens/s and model FLOPs utilisation (MFU) against the device's dense bf16 peak.

MFU is per GPU: the FLOPs one rank executes (its tokens' model FLOPs divided
by the tensor-parallel size, since TP ranks split every matmul of the same
tokens) over that GPU's spec-sheet peak.  A device without a table entry
(any CPU, an unknown GPU) reports MFU as unknown (None), never a guess.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by GPU name substring; first match wins, so
# specific names come before their family (torch reports e.g. "NVIDIA H100 80GB HBM3" for SXM).
GPU_PEAK_BF16 = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("B100", 1.75e15),
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H800 PCIe", 756e12), ("H800", 989e12), ("H200", 989e12), ("H20", 148e12),
    ("A100", 312e12), ("A800", 312e12), ("A30", 165e12), ("A10G", 70e12), ("A10", 125e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 6000 Ada", 364e12), ("RTX 4090", 165e12),
    ("A6000", 155e12), ("MI300X", 1307e12), ("MI250X", 383e12), ("V100", 125e12),  # V100: fp16 (no bf16)
]


def peak_flops(device_name: str) -> Optional[float]:
    """The spec-sheet dense bf16 peak of a GPU name, or None when it is not in the table."""
    for key, value in GPU_PEAK_BF16:
        if key in device_name:
            return value
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Meter:
    """Rate of tokens (and MFU) since the last ``read``.

    flops_per_token: model FLOPs of one token's step (student, and ST-AR's teacher);
    tp: tensor-parallel size (each rank executes 1/tp of those FLOPs);
    peak: FLOP/s of one device, None for unknown.
    """

    def __init__(self, flops_per_token: float, device: torch.device, tp: int = 1, peak: Optional[float] = None):
        self.flops_per_token = flops_per_token / tp
        self.peak = peak if peak is not None else peak_flops(device_name(device))
        if self.peak is None:
            log.info("MFU unknown: no peak FLOP/s for %s in the table", device_name(device))
        self.tokens, self.t0 = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        """Tokens processed by this rank (its data-parallel share of the global batch)."""
        self.tokens += tokens

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.tokens / dt
        self.tokens, self.t0 = 0, time.perf_counter()
        mfu = rate * self.flops_per_token / self.peak if self.peak else None
        return {"tokens_per_s": rate, "mfu": mfu}


def memory_stats(device: torch.device) -> dict:
    """Peak memory in GiB: CUDA allocator peak on GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return {"memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is KiB on Linux
