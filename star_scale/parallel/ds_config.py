"""The DeepSpeed JSON, generated from the recipe; ``parallel.deepspeed_config`` may override any key.

Batch sizes count images (sequences per view) per optimizer step: global =
micro x accumulation steps x data-parallel size.  Precision: ``precision_policy``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from star_scale.config import Config, ConfigError


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# DeepSpeed's defaults, written out so `star-scale plan` reads the sizes the engine uses (in elements).
# ZeRO-1/2 allocate one reduce bucket (two with overlap_comm) in the gradients' dtype during backward;
# ZeRO-3 gathers whole weights until max_live_parameters are alive and keeps those it reuses within
# max_reuse_distance (measured: star_scale/bench/engine_bytes.py, `bench memory --state`).
BUCKETS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
           "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
           "stage3_max_reuse_distance": 1_000_000_000}


def batch_sizes(cfg: Config, dp: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps)."""
    per_rank = cfg.data.global_batch // dp
    micro = cfg.data.micro_batch or per_rank
    return micro, per_rank // micro


def precision_policy(dtype: torch.dtype, bf16_weights: bool = False) -> dict:
    """bf16 the way the single-process engine does it, so one GPU and many are numerically comparable.

    fp32 weights, bf16 compute under torch.autocast (norms, softmax and the loss stay fp32),
    fp32 gradients, accumulated and reduced in fp32 (no parameter gets a bf16 comm dtype:
    ``lower_precision_safe_modules`` is empty).  Per parameter: fp32 weights, grads, ZeRO's own
    fp32 master copy and two moments (4 + 4 + 4 + 8 bytes), and fp32 ZeRO-3 gathers.

    ``parallel.bf16_weights``: DeepSpeed's own ``bf16`` mode instead, bf16 weights, gradients
    reduced in bf16 (``communication_data_type``) into an fp32 partition (ZeRO-3: bf16), fp32
    masters: 2 + 4 + 4 + 8 bytes (ZeRO-3: 2 + 2 + 4 + 8; measured), half the ZeRO-3 gather and reduce-bucket bytes, and a forward on
    bf16-rounded weights (tests/dist/test_bf16.py bounds the losses' drift from one process).
    """
    if bf16_weights:
        if dtype != torch.bfloat16:
            raise ConfigError("parallel.bf16_weights=true: expected train.precision=bf16 (it resolved to fp32 "
                              "on this device)")
        return {"bf16": {"enabled": True}, "communication_data_type": "bf16"}
    autocast = dtype == torch.bfloat16
    out = {"bf16": {"enabled": False}}
    if autocast:
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        out["data_types"] = {"grad_accum_dtype": "fp32"}
        out["communication_data_type"] = "fp32"
    return out


def student_config(cfg: Config, dp: int, dtype: torch.dtype, device: torch.device) -> dict:
    micro, accumulation = batch_sizes(cfg, dp)
    generated = {
        "train_batch_size": cfg.data.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optimizer.grad_clip,
        **precision_policy(dtype, cfg.parallel.bf16_weights),
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            # Overlapping communication needs CUDA streams; on CPU it only adds copies.
            "overlap_comm": device.type == "cuda",
            "contiguous_gradients": True,
            **BUCKETS,
        },
        # The client optimizer is torch AdamW (DeepSpeed's own Adams JIT-build C++/CUDA ops).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.deepspeed_config:
        path = Path(cfg.parallel.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"parallel.deepspeed_config={str(path)!r}: file not found")
        try:
            user = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"parallel.deepspeed_config={str(path)!r}: invalid JSON: {e}") from None
        generated = deep_merge(generated, user)
    return generated


def teacher_config(student: dict) -> dict:
    """The teacher's engine: the student's partitioning, no optimizer, nothing kept whole.

    ``stage3_param_persistence_threshold: 0``: by default small parameters stay
    whole on every rank; their partitions are then never re-read and the EMA,
    applied to partitions, would not reach them (measured: 1.2e-2 off).
    """
    out = {k: v for k, v in student.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
    out["zero_optimization"] = dict(student["zero_optimization"], stage3_param_persistence_threshold=0)
    return out
