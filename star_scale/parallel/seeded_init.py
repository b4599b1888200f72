"""``deepspeed.zero.Init`` without its start-up broadcast, for weights every rank computed itself.

DeepSpeed's Init broadcasts each parameter from the partition group's rank 0
before partitioning it (``Init._zero_init_param``), one whole-model broadcast
at start-up, in case ranks initialised differently.  Here every rank fills a
unit from the same seeded generators (``GPT.initial_value``), so the values are
equal by construction, except where ranks run different CPU code (another
vectorised ``normal_`` on another CPU type can differ in the last bit).  So
each unit is checked instead: one all-reduce of a 2-element bit fingerprint
over the partition group; the broadcast runs only for a unit where ranks
disagree (with a warning), which keeps every rank's partition consistent.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import Init

log = logging.getLogger(__name__)


def fingerprint(params) -> torch.Tensor:
    """Sum of the values' bytes read as 64-bit integers (wrapping): exact and order-free, so equal on equal
    values, and always moved by a difference in one element (several cancel only by chance); no copy of the
    values, a few % of the time drawing them takes."""
    total = torch.zeros((), dtype=torch.int64, device=params[0].device)
    for p in params:
        raw = p.detach().contiguous().view(-1).view(torch.uint8)
        whole = raw.numel() // 8 * 8
        tail = raw[whole:].to(torch.int64) << (8 * torch.arange(raw.numel() - whole, device=raw.device))
        total += raw[:whole].view(torch.int64).sum() + tail.sum()
    return total


def ranks_agree(params, group) -> bool:
    """Whether every rank of ``group`` holds bit-equal ``params`` (one all-reduce)."""
    f = fingerprint(params)
    both = torch.stack([f, -f])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return bool(both[0] == -both[1])  # max == min


class SeededInit(Init):
    """Partitions without broadcasting while ``broadcast`` is False (see the module docstring)."""

    def __init__(self, *args, broadcast: bool = False, **kwargs):
        self.broadcast = broadcast  # read by __init__ itself when it is given a module
        super().__init__(*args, **kwargs)

    def _zero_init_param(self, param):
        if self.broadcast:
            return super()._zero_init_param(param)
        self._convert_to_deepspeed_param(param)
        param.partition()


def checked_broadcast(params, group, what: str) -> bool:
    """True if the partition group must broadcast ``params`` (their ranks disagree)."""
    if dist.get_world_size(group) == 1 or ranks_agree(params, group):
        return False
    log.warning("%s: initial values differ across data-parallel ranks (another CPU type?); "
                "broadcasting them from the group's first rank", what)
    return True

