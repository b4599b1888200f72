"""Per-task GPU binding: the device index each rank uses, from faked launcher environments."""
from __future__ import annotations

import pytest
import torch

from star_scale.parallel.devices import cuda_device_index, deepspeed_args, export_device_rank, local_world_size
from star_scale.parallel.launch import detect


def _index(env: dict, device_count: int) -> int:
    return cuda_device_index(detect(env).local_rank, device_count, local_world_size(env))


def test_torchrun_with_every_gpu_visible_uses_local_rank():
    env = {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}
    assert _index(env, 8) == 5


def test_srun_gpus_per_task_1_every_rank_uses_device_0():
    # srun --ntasks-per-node=8 --gpus-per-task=1: each task sees one GPU, as device 0.
    for local in range(8):
        env = {"SLURM_PROCID": str(8 + local), "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": str(local),
               "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NODELIST": "gpu01", "MASTER_ADDR": "gpu01"}
        assert _index(env, 1) == 0


def _srun_env(local: int, tasks_per_node: int = 8) -> dict:
    return {"SLURM_PROCID": str(local), "SLURM_STEP_NUM_TASKS": str(tasks_per_node), "SLURM_LOCALID": str(local),
            "SLURM_STEP_TASKS_PER_NODE": str(tasks_per_node), "MASTER_ADDR": "gpu01"}


def test_partial_binding_spreads_the_tasks_over_their_shared_devices():
    # --gpu-bind=closest, 8 tasks on 2 sockets: tasks 0-3 see socket 0's four GPUs, tasks 4-7 socket 1's,
    # each set as devices 0-3. Device 0 for all would put four ranks on one GPU.
    assert [_index(_srun_env(local), 4) for local in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    # --gpus-per-task=2, 4 tasks: each task's own pair; either device is the task's own.
    assert [_index(_srun_env(local, 4), 2) for local in range(4)] == [0, 1, 0, 1]


def test_local_rank_is_exported_as_the_device_index_deepspeed_will_use():
    # DeepSpeed's init_process_group(device_id=...) and zero.Init read LOCAL_RANK, not our choice.
    for count, expected in ((1, [0] * 8), (4, [0, 1, 2, 3] * 2), (8, list(range(8)))):
        exported = []
        for local in range(8):
            env = _srun_env(local)
            le = detect(env)  # what export_torch_env writes before init_layout binds the device:
            env.update(RANK=str(le.rank), WORLD_SIZE=str(le.world_size), LOCAL_RANK=str(le.local_rank))
            index = export_device_rank(detect(env).local_rank, count, env)
            exported.append(int(env["LOCAL_RANK"]))
            assert index == int(env["LOCAL_RANK"]) == _index(env, count)  # a later detect() names the same device
        assert exported == expected, count


def test_srun_without_binding_uses_local_id():
    env = {"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "6", "SLURM_STEP_TASKS_PER_NODE": "8",
           "MASTER_ADDR": "gpu01"}
    assert _index(env, 8) == 6


def test_local_world_parsing():
    assert local_world_size({"SLURM_STEP_TASKS_PER_NODE": "4,3"}) == 4
    assert local_world_size({"SLURM_TASKS_PER_NODE": "2(x3)"}) == 2
    assert local_world_size({}) is None


def test_no_visible_device_and_too_few_devices_are_named(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="local rank 2 asked for a CUDA device, but none is visible"):
        cuda_device_index(2, 0, 4)
    with pytest.raises(RuntimeError, match="local rank 3 but only 2 CUDA devices visible"):
        cuda_device_index(3, 2, None)


def test_deepspeed_is_told_the_chosen_index_not_local_rank():
    assert deepspeed_args(torch.device("cuda", 0)).device_rank == 0
    assert deepspeed_args(torch.device("cuda", 3)).device_rank == 3
    assert deepspeed_args(torch.device("cpu")).device_rank == 0
