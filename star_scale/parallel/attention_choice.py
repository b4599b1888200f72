"""One masked-attention backend for every rank, chosen at the training shape.

Timing is noisy and ranks can differ (another GPU, a neighbour's load): ranks that ran different
kernels would differ in the last bits of the MIM student's attention, and a compiled FlexAttention on
one rank only would stall the others at the first step. So rank 0 times the candidates at the shape
one micro-batch runs and every rank takes its choice.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from star_scale.models import attention
from star_scale.objectives.module import masked_attention_shape


def agree_masked_attention(module: nn.Module, micro_batch: int, tp: int, device: torch.device, dtype: torch.dtype,
                           timer=None) -> Optional[str]:
    """Rank 0's choice (timed with ``timer``, see ``attention.measure_masked``), used on every rank (collective);
    None when the module runs nothing masked."""
    shape = masked_attention_shape(module, micro_batch, tp)
    if shape is None:  # the same on every rank: then none enters the broadcast
        return None
    choice = [attention.choose_masked(device, shape, dtype, timer) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    attention.use_masked(device, shape.head_dim, dtype, choice[0])
    return choice[0]
