"""Whole-parameter views of a DeepSpeed engine's state, whatever the ZeRO stage.

Consolidation (elastic resume, export) needs, for every parameter, its fp32
master value and its AdamW moments as one tensor of the parameter's
(TP-local) shape; loading needs the reverse.  DeepSpeed's public
``safe_get/set_full_*`` functions do that for ZeRO 1-3 and bf16 (collectives
over the data-parallel group: every rank calls them for every parameter in the
same order); at stage 0 in fp32 the parameter and torch's optimizer state are
already whole.  ZeRO-3 partition geometry (for the teacher, which has no
optimizer): rank i of the data-parallel group holds elements
[i * n, (i + 1) * n) of the flattened, zero-padded parameter.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state besides its step count


def shape_of(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed wraps (ZeRO keeps it as ``.optimizer``)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _torch_state(engine, p) -> dict:
    return base_optimizer(engine).state.get(p, {})


def link_optimizer_fragments(engine) -> None:
    """ZeRO 1-2 / bf16: map AdamW's state into each parameter's fragment view, for every group.

    DeepSpeed links them once, right after the first param group's first step,
    when later groups have no state yet: their fragments then never see
    exp_avg (safe_get_full_optimizer_state raises).  Linking again is idempotent.
    """
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state") and base_optimizer(engine).state:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def full_fp32(engine, p) -> torch.Tensor:
    w = safe_get_full_fp32_param(p)
    return (p.detach() if w is None else w).float().reshape(shape_of(p)).clone()


def full_moment(engine, p, key: str) -> torch.Tensor:
    m = safe_get_full_optimizer_state(p, key)
    if m is None:  # stage 0, fp32: torch's own state, keyed by the parameter
        m = _torch_state(engine, p).get(key)
        if m is None:
            m = torch.zeros(shape_of(p))
    return m.float().reshape(shape_of(p)).clone()


def optimizer_step(engine) -> int:
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _master_flats(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer steps: ZeRO's fp32 partitions, or the parameters at stage 0.

    ZeRO-3 empties the optimizer's param_groups between steps (it fills them per
    sub-group while stepping), so they cannot be read from there.
    """
    zero = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(zero, attr, None)
        if flats:
            return list(flats)
    return [p for g in base_optimizer(engine).param_groups for p in g["params"]]


def ensure_optimizer_state(engine, step: int) -> None:
    """Create AdamW's lazily-built state (as torch would on its first step) and set its step count."""
    opt = base_optimizer(engine)
    on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    for flat in _master_flats(engine):
        state = opt.state[flat]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=flat.device if on_device else "cpu")
    link_optimizer_fragments(engine)


def set_full(engine, p, weight: torch.Tensor, moments: dict) -> None:
    """Load one parameter: low-precision copy, fp32 master, AdamW moments (call ensure_optimizer_state first)."""
    weight = weight.to(p.device)
    if hasattr(p, "ds_id"):
        # Inside the context the parameter is whole; on exit DeepSpeed re-partitions it,
        # which also refreshes parameters kept whole ("persistent") on every rank.
        with GatheredParameters([p], modifier_rank=0):
            with torch.no_grad():
                p.data.copy_(weight.to(p.dtype))
    else:
        with torch.no_grad():
            p.data.copy_(weight.to(p.dtype))
    safe_set_full_fp32_param(p, weight)
    for key in MOMENTS:
        value = moments[key].to(p.device)
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_optimizer_state(p, value, key)
        else:
            _torch_state(engine, p)[key] = value.clone()


# ---- ZeRO-3 partitions without an optimizer (the teacher) ------------------------
def gather_partitions(p, local: torch.Tensor) -> torch.Tensor:
    """Whole (TP-local) tensor from every data-parallel rank's partition ``local`` of parameter ``p``."""
    group = p.ds_process_group
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)


def partition_of(p, whole: torch.Tensor) -> torch.Tensor:
    """This rank's partition of a whole (TP-local) tensor, shaped like ``p.ds_tensor``."""
    n = p.ds_tensor.numel()
    rank = dist.get_rank(group=p.ds_process_group)
    flat = whole.reshape(-1)
    out = torch.zeros(n, dtype=flat.dtype, device=flat.device)
    piece = flat[rank * n : (rank + 1) * n]
    out[: piece.numel()] = piece
    return out
