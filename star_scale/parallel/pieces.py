"""An engine's state as the pieces this rank holds, and back: the two ends of a sharded checkpoint.

What a rank holds of each training-module parameter (its TP-local tensor, flattened):

- ZeRO-3: elements [r * n, (r + 1) * n) of the fp32 master and both AdamW moments, r its rank in
  the parameter's data-parallel group, n the partition size (``safe_get/set_local_*``);
- ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the fragment of the master and moments that falls in
  its partition of the flat group (``_hp_mapping``), possibly empty; the low-precision parameter is
  whole on every rank and is rebuilt from the masters after loading (``safe_get_full_fp32_param``,
  one parameter at a time);
- ZeRO-0: everything, whole; it saves an equal 1/dp slice and loads the whole tensor.

The teacher likewise: the ZeRO-3 ``ShardedTeacher``'s fp32 partitions, the stage 0-2
``ReplicatedTeacher``'s whole weights (saved 1/dp per rank).  Nothing here gathers a whole model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_get_local_optimizer_state,
                             safe_set_local_fp32_param, safe_set_local_optimizer_state)

from star_scale.parallel.shard_files import ShardReader, ShardWriter, even_slice
from star_scale.parallel.tensor_parallel import partition_of
from star_scale.parallel.zero_state import (MOMENTS, _torch_state, ensure_optimizer_state, gather_partitions,
                                            link_optimizer_fragments, set_full, shape_of)


def _full_shape(p, tp: int) -> list[int]:
    shape = list(shape_of(p))
    dim, _ = partition_of(p)
    if dim is not None:
        shape[dim] *= tp
    return shape


def _zero3_range(p) -> tuple[int, int]:
    n, numel = p.ds_tensor.numel(), shape_of(p).numel()
    start = min(dist.get_rank(group=p.ds_process_group) * n, numel)
    return start, min(start + n, numel)


def _held_range(p, dp_rank: int, dp: int, saving: bool) -> tuple[int, int]:
    if hasattr(p, "ds_id"):
        return _zero3_range(p)
    if hasattr(p, "_hp_mapping"):
        frag = p._hp_mapping
        if frag is None:
            return 0, 0
        return frag.lp_fragment_address.start, frag.lp_fragment_address.start + frag.lp_fragment_address.numel
    return even_slice(shape_of(p).numel(), dp_rank, dp) if saving else (0, shape_of(p).numel())


def _student_values(engine, p, start: int, stop: int) -> dict[str, torch.Tensor]:
    k = stop - start
    if hasattr(p, "ds_id"):
        return {"student": safe_get_local_fp32_param(p).reshape(-1)[:k],
                **{m: safe_get_local_optimizer_state(p, m).reshape(-1)[:k] for m in MOMENTS}}
    if hasattr(p, "_hp_mapping"):
        frag = p._hp_mapping
        return {"student": frag.hp_fragment.reshape(-1), **{m: frag.get_optim_state_fragment(m).reshape(-1)
                                                            for m in MOMENTS}}
    state = _torch_state(engine.ds, p)
    zeros = torch.zeros(k)
    return {"student": p.detach().reshape(-1)[start:stop],
            **{m: state[m].reshape(-1)[start:stop] if m in state else zeros for m in MOMENTS}}


def _teacher_params(teacher):
    """(name, parameter, fp32 values of what this rank holds as a flat view or None, ZeRO-3?)."""
    if hasattr(teacher, "masters"):  # ShardedTeacher
        return [(n, p, m, True) for n, p, m in zip(teacher.names, teacher.params, teacher.masters)]
    return [(n, p, p, False) for n, p in teacher.model.named_parameters()]


def collect(engine) -> ShardWriter:
    """Views of every piece this rank holds (no copies: snapshot them to save asynchronously)."""
    L, out = engine.layout, ShardWriter()
    link_optimizer_fragments(engine.ds)
    for name, p in engine.module.named_parameters():
        start, stop = _held_range(p, L.dp_rank, L.dp, saving=True)
        if start == stop:
            continue
        dim, stride = partition_of(p)
        for kind, values in _student_values(engine, p, start, stop).items():
            out.add(f"{kind}/{name}", values.float(), start, _full_shape(p, L.tp), dim, stride, L.tp_rank, L.tp)
    if engine.teacher is not None:
        for name, p, values, zero3 in _teacher_params(engine.teacher):
            start, stop = _zero3_range(p) if zero3 else even_slice(p.numel(), L.dp_rank, L.dp)
            if start < stop:
                dim, stride = partition_of(p)
                flat = values.reshape(-1)
                piece = flat[: stop - start] if zero3 else flat[start:stop]
                out.add(f"teacher/{name}", piece.float(), start, _full_shape(p, L.tp), dim, stride, L.tp_rank, L.tp)
    return out


def _padded(values: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=values.dtype)
    out[: values.numel()] = values
    return out


@torch.no_grad()
def restore(engine, reader: ShardReader, step: int, adam_step: int) -> None:
    """Load this rank's pieces of every parameter from ``reader`` (any layout it was saved in); collective."""
    L = engine.layout
    ensure_optimizer_state(engine.ds, adam_step)  # creates AdamW's state and links ZeRO-1/2 fragments
    rebuild = []  # (parameter, its fp32 partition or None): low-precision copies to make whole again
    for name, p in engine.module.named_parameters():
        dim, stride = partition_of(p)
        start, stop = _held_range(p, L.dp_rank, L.dp, saving=False)
        read = {kind: reader.local(f"{kind}/{name}", dim, stride, L.tp_rank, L.tp, start, stop).to(p.device)
                for kind in ("student", *MOMENTS)}
        if hasattr(p, "ds_id"):
            n = p.ds_tensor.numel()
            part = _padded(read["student"], n).to(p.device)
            safe_set_local_fp32_param(p, part)
            for m in MOMENTS:
                safe_set_local_optimizer_state(p, _padded(read[m], n).to(p.device), m)
            p.ds_tensor.data.copy_(part.view_as(p.ds_tensor))
            if p.data.numel() == shape_of(p).numel():  # gathered and kept ("persistent"): whole again from the parts
                rebuild.append((p, part))
        elif hasattr(p, "_hp_mapping"):
            frag = p._hp_mapping
            if frag is not None:
                frag.hp_fragment.copy_(read["student"])
                for m in MOMENTS:
                    frag.get_optim_state_fragment(m).copy_(read[m])
            rebuild.append((p, None))
        else:
            shape = shape_of(p)
            set_full(engine.ds, p, read["student"].view(shape), {m: read[m].view(shape) for m in MOMENTS})
    for p, part in rebuild:
        whole = gather_partitions(p, part) if part is not None else safe_get_full_fp32_param(p)
        p.data.copy_(whole.reshape(p.data.shape).to(p.dtype))
    if engine.teacher is not None:
        _restore_teacher(engine.teacher, reader, L)
    engine.ds.global_steps = step
    engine.ds.global_samples = step * engine.cfg.data.global_batch


@torch.no_grad()
def _restore_teacher(teacher, reader: ShardReader, L) -> None:
    for name, p, values, zero3 in _teacher_params(teacher):
        dim, stride = partition_of(p)
        start, stop = _zero3_range(p) if zero3 else (0, p.numel())
        got = reader.local(f"teacher/{name}", dim, stride, L.tp_rank, L.tp, start, stop)
        if zero3:
            values.copy_(_padded(got, values.numel()).view_as(values).to(values.device))
        else:
            values.copy_(got.view_as(values).to(values.device, values.dtype))
    if hasattr(teacher, "_refresh"):
        teacher._refresh()
