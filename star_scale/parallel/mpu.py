"""The ``mpu`` object DeepSpeed asks for the model-parallel layout.

DeepSpeed calls get_model_parallel_* (which megatron.core.parallel_state names
get_tensor_model_parallel_*) and get_data_parallel_group_ranks (absent there).
Without an mpu DeepSpeed silently treats tensor-parallel ranks as data-parallel
ones: it averages different weight shards together and the loss is wrong with
no error (measured), so the engine always passes this adapter.
"""
from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    # Names DeepSpeed uses for tensor parallelism.
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    # Data parallelism: ZeRO's partitioning and gradient averaging group.
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())
