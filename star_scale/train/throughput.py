"""Tokens/s and model FLOPs utilisation (MFU) against the device's dense bf16 peak.

MFU is per GPU: the FLOPs one rank executes (its tokens' model FLOPs divided
by the tensor-parallel size, since TP ranks split every matmul of the same
tokens) over that GPU's spec-sheet peak.  A device without a table entry
(any CPU, an unknown GPU) reports MFU as unknown (None), never a guess.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Optional

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, by (model, form factor).  The form
# factor matters: an H200 NVL or H100 PCIe runs at lower clocks and power than the SXM part of the
# same name ("NVIDIA H200" is the SXM part, "NVIDIA H200 NVL" is not).
GPU_PEAK_BF16 = {
    ("GB200", "SXM"): 2.5e15, ("B200", "SXM"): 2.25e15, ("B100", "SXM"): 1.75e15,
    ("H200", "SXM"): 989e12, ("H200", "NVL"): 835e12, ("GH200", "SXM"): 989e12,
    ("H100", "SXM"): 989e12, ("H100", "NVL"): 835e12, ("H100", "PCIe"): 756e12,
    ("H800", "SXM"): 989e12, ("H800", "PCIe"): 756e12, ("H20", "SXM"): 148e12,
    ("A100", "SXM"): 312e12, ("A100", "PCIe"): 312e12, ("A800", "SXM"): 312e12, ("A800", "PCIe"): 312e12,
    ("A30", "PCIe"): 165e12, ("A10G", "PCIe"): 70e12, ("A10", "PCIe"): 125e12,
    ("L40S", "PCIe"): 362e12, ("L40", "PCIe"): 181e12, ("L4", "PCIe"): 121e12,
    ("RTX 6000 Ada", "PCIe"): 364e12, ("RTX 4090", "PCIe"): 165e12, ("RTX A6000", "PCIe"): 155e12,
    ("MI300X", "SXM"): 1307e12,
    ("MI250X", "SXM"): 191.5e12,  # per die: torch shows each of the package's two dies as one device
    ("V100", "SXM"): 125e12, ("V100", "PCIe"): 112e12,  # fp16: V100 has no bf16 tensor cores
}
# Cards sold only as PCIe boards say nothing of it in their name.
_PCIE_ONLY = {"A30", "A10G", "A10", "L40S", "L40", "L4", "RTX 6000 Ada", "RTX 4090", "RTX A6000"}


def gpu_model(device_name: str) -> Optional[tuple[str, str]]:
    """(model, form factor) of a device name as torch reports it, or None for a name not in the table.

    A model matches as a whole token ("H20" is not "H200", "L4" is not "L40", "A10" is not "A100-SXM4"); the
    form factor is NVL or PCIe when the name says so ("NVIDIA A100-PCIE-40GB"), else the part's only one."""
    for model in sorted({m for m, _ in GPU_PEAK_BF16}, key=len, reverse=True):
        if re.search(rf"(?<![\w]){re.escape(model)}(?![\w])", device_name):
            if model in _PCIE_ONLY:
                return model, "PCIe"
            if re.search(r"\bNVL\b", device_name):
                return model, "NVL"
            return model, "PCIe" if re.search(r"\bPCIe\b", device_name, re.IGNORECASE) else "SXM"
    return None


def peak_flops(device_name: str) -> Optional[float]:
    """The spec-sheet dense bf16 peak of a device name, or None when its model and form factor are not listed."""
    model = gpu_model(device_name)
    return GPU_PEAK_BF16.get(model) if model else None


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
