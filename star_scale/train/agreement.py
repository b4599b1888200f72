"""Ranks agreeing on a small host-side number without waiting for the device: launched now, read later.

A blocking all-reduce followed by ``.item()`` makes the host wait for every kernel queued before it
(a whole step on a GPU). Here the MAX all-reduce is launched asynchronously, copied to pinned host
memory behind the queued work, and read at the caller's next agreement point (steps later), by when
the device has long finished it: the read waits for nothing. Every rank must create and read its
agreements at the same steps.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class Agreement:
    """MAX over ranks of one int, launched at construction (collective), read by ``read``."""

    def __init__(self, value: int, device: torch.device):
        t = torch.full((1,), value, dtype=torch.int64, device=device)  # a fill kernel: no host-to-device copy
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        self._ready = None
        if device.type == "cuda":
            work.wait()  # the current stream waits for the reduction; the host does not
            self._host = torch.empty(1, dtype=torch.int64, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._work = t, work

    def read(self) -> int:
        if self._ready is not None:
            self._ready.synchronize()  # recorded an agreement point ago: long done
        else:
            self._work.wait()
        return int(self._host.item())  # a host tensor: no device read
