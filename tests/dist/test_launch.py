"""Rank/world/rendezvous from torchrun, the deepspeed launcher and srun; the generated DeepSpeed config."""
import json

import pytest
import torch

from star_scale.config import ConfigError, load_config
from star_scale.parallel.launch import detect, expand_hostlist, strip_launcher_args


def test_torchrun_and_deepspeed_launcher_env():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}  # torchrun inside srun: torchrun's values win
    le = detect(env)
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == (3, 4, 1, "n1", 1234)
    assert le.launcher == "torchrun" and le.distributed


def test_srun_env():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    le = detect(env)
    assert (le.rank, le.world_size, le.local_rank, le.launcher) == (5, 8, 1, "slurm")
    assert le.master_addr == "gpu07" and le.master_port == 20000 + 4242
    # A batch script's own shell (no job step) is one process, not the job's tasks.
    assert not detect({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}).distributed


def test_hostlists():
    assert expand_hostlist("gpu[01-03,7],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]
    assert expand_hostlist("a[1-2]-ib,b") == ["a1-ib", "a2-ib", "b"]


def test_deepspeed_launcher_local_rank_argument_is_dropped(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["--local_rank=1", "train", "r.yaml", "x=1"]) == ["train", "r.yaml", "x=1"]
    assert strip_launcher_args(["--local-rank", "0", "train"]) == ["train"]


def test_deepspeed_config_from_recipe_and_override(tmp_path):
    from star_scale.parallel.ds_config import BUCKETS, student_config, teacher_config

    cfg = load_config(None, ["data.global_batch=32", "data.micro_batch=4", "parallel.zero_stage=3"], world_size=4)
    c = student_config(cfg, dp=2, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (32, 4, 4)
    assert c["zero_optimization"]["stage"] == 3 and c["gradient_clipping"] == 1.0
    # bf16 = LocalEngine's policy: autocast over fp32 weights, fp32 grads accumulated and reduced in fp32.
    assert not c["bf16"]["enabled"] and c["torch_autocast"] == {"enabled": True, "dtype": "bfloat16",
                                                                 "lower_precision_safe_modules": []}
    assert c["data_types"]["grad_accum_dtype"] == "fp32" and c["communication_data_type"] == "fp32"
    assert "torch_autocast" not in student_config(cfg, dp=2, dtype=torch.float32, device=torch.device("cpu"))
    t = teacher_config(c)
    assert t["zero_optimization"]["stage3_param_persistence_threshold"] == 0 and "gradient_clipping" not in t
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}))
    cfg.parallel.deepspeed_config = str(raw)
    c = student_config(cfg, dp=2, dtype=torch.float32, device=torch.device("cpu"))
    # The user's key replaces the generated one; the other buckets stay DeepSpeed's defaults, written out for plan.
    assert c["zero_optimization"] == {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                      **BUCKETS, "reduce_bucket_size": 1000}
    assert c["steps_per_print"] == 5 and not c["bf16"]["enabled"]
    cfg.parallel.deepspeed_config = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="parallel.deepspeed_config"):
        student_config(cfg, dp=2, dtype=torch.float32, device=torch.device("cpu"))


def test_qkv_strided_shards_give_each_rank_its_heads():
    from star_scale.parallel.tensor_parallel import shard, unshard

    heads, d = 4, 2  # rows: q(h0..h3) | k(h0..h3) | v(h0..h3), d rows per head
    full = torch.arange(3 * heads * d).view(-1, 1)
    parts = [shard(full, 0, 3, r, 2) for r in range(2)]
    # rank 0: q, k, v of heads 0-1; rank 1: of heads 2-3
    assert parts[0].flatten().tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    assert torch.equal(unshard(parts, 0, 3), full)
