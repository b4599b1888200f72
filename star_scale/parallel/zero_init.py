"""ZeRO-3 partitioning while a model is being allocated.

A GPT built on the meta device is allocated one unit at a time
(``GPT.materialize``); under ZeRO-3 each unit is partitioned over the
data-parallel group as soon as it is filled, before the next one exists.  A
rank then holds its 1/N of the weights plus one unit (a block, or the
embedding table) at any moment of start-up, never the whole model.  The
engines' ``deepspeed.initialize`` finds the parameters already partitioned and
leaves them as they are.

The first unit goes through ``deepspeed.zero.Init(module=...)`` (as ``SeededInit``, which
skips Init's broadcast from rank 0 where the ranks' values agree) with the
engine's own DeepSpeed config and data-parallel group (so partitions take the
dtype, device and group that ``deepspeed.initialize`` would give them); later units through that first
parameter's ``convert_to_zero_parameters``, the same call DeepSpeed makes for
parameters added to a partitioned model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from deepspeed.runtime.zero.partition_parameters import is_zero_param

from star_scale.parallel.seeded_init import SeededInit, checked_broadcast


def partitioner(ds_config: dict, mpu):
    """``after_unit`` for ``GPT.materialize``: partition the unit's parameters (ZeRO-3)."""
    converted = []
    bf16 = ds_config.get("bf16", {}).get("enabled", False)

    def partition(unit: nn.Module) -> None:
        params = [p for p in unit.parameters() if not is_zero_param(p)]
        if not params:
            return
        if bf16:  # Init given a built module partitions it in the module's dtype, not the config's
            for p in params:
                p.data = p.data.to(torch.bfloat16)
        # No broadcast from rank 0 where every rank drew the same values (seeded_init.py).
        broadcast = checked_broadcast(params, mpu.get_data_parallel_group(), type(unit).__name__)
        if converted:
            converted[0].broadcast = broadcast
            converted[1].convert_to_zero_parameters(param_list=params)
        else:
            # The group as DeepSpeed itself passes it: without it Init partitions over the whole world,
            # tensor-parallel ranks included, and broadcasts rank 0's shards to them.
            converted.extend([SeededInit(module=unit, config_dict_or_path=ds_config, mpu=mpu, broadcast=broadcast,
                                         data_parallel_group=mpu.get_data_parallel_group()), params[0]])
    return partition


def cast_whole_params(module: nn.Module, dtype: torch.dtype) -> None:
    """The parameters no unit partitioned (the training module's own heads), in the partitions' dtype:
    ``deepspeed.initialize`` partitions them as they are, and ZeRO-3 needs one dtype throughout."""
    for p in module.parameters():
        if not is_zero_param(p):
            p.data = p.data.to(dtype)
