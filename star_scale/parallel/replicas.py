"""Tensor-parallel replicas must stay equal: a cheap check that they do, failing loudly when not.

Under TP every rank of a group holds its own copy of the unsharded parameters
(norms, the class table, biases of row-parallel layers, the projector). They
agree only as long as every rank of the group computes the same thing (the same
data and the same dropout masks): a bug there lets them drift apart silently,
and the consolidated checkpoint then keeps rank 0's copy. The check compares
two float64 moments of each replicated parameter (its ZeRO-3 partition: the
ranks of one TP group hold the same slice) across the group: one small
all-gather.

Tolerance, not bit-equality and not a broadcast: on GPUs each TP rank's
replicated gradients are reduced by its own data-parallel communicator, and
NCCL may sum in another order on each, so the copies can differ in their last
bits without any bug.  The check accepts differences up to ``RTOL`` times the
largest the moments can move when every element moves by that relative amount
(|d sum| <= sqrt(n * sum x^2) * rtol, |d sum x^2| <= 2 * sum x^2 * rtol): a few
fp32 ulps per element (1.2e-7 each) pass.  A real drift (other data or dropout
within a TP group) moves weights by about the learning rate per step, orders of
magnitude more, and is caught.  A broadcast from TP rank 0 would have to rewrite
ZeRO's fp32 masters and AdamW moments (one layout per stage) to stick, and
would hide the bug this check exists to find.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from star_scale.parallel.tensor_parallel import partition_of


RTOL = 1e-6  # per element, relative: about 8 fp32 ulps (see the module docstring)


class ReplicaMismatch(RuntimeError):
    pass


def replica_fingerprint(module: nn.Module) -> tuple[list[str], torch.Tensor]:
    """(names, (n, 3) float64 sum, sum of squares and element count) of the TP-replicated parameters."""
    names, rows = [], []
    for name, p in module.named_parameters():
        if partition_of(p)[0] is not None:
            continue
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3: this rank's slice
        x = local.detach().double()
        names.append(name)
        rows.append(torch.stack([x.sum(), (x * x).sum(), torch.tensor(x.numel(), dtype=torch.float64)]))
    return names, (torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64))


def check_replicas(module: nn.Module, tp_group, rtol: float = RTOL) -> None:
    """Raise ReplicaMismatch naming the first parameter whose copies differ across the TP group by more than
    ``rtol`` per element (collective)."""
    names, mine = replica_fingerprint(module)
    world = dist.get_world_size(tp_group)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine.contiguous(), group=tp_group)
    ref = parts[0]
    sumsq, count = ref[:, 1], ref[:, 2]
    limit = rtol * torch.stack([(count * sumsq).sqrt(), 2 * sumsq], dim=1)
    for r, other in enumerate(parts[1:], start=1):
        bad = ((other[:, :2] - ref[:, :2]).abs() > limit).any(dim=1).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ReplicaMismatch(
                f"tensor-parallel replicas differ: parameter {names[i]} on TP rank {r} (sum {other[i, 0].item():.9g}) "
                f"vs TP rank 0 (sum {ref[i, 0].item():.9g}), beyond rounding (rtol {rtol:g} per element); the TP ranks no longer compute the same model "
                "(different data or dropout streams within a TP group?)")
