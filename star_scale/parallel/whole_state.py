"""Whole TP = 1 fp32 state of a distributed engine, in memory (``engine.state_dict``): collective, rank 0 keeps it.

Not on the checkpoint path (checkpoints are per-rank shards, ``parallel/pieces.py``): this is the
bridge for tests and tools that want one process's view of a small model, and the loader of
checkpoints written before the sharded format (their ``consolidated.pt``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from star_scale.parallel.consolidated import CONSOLIDATED
from star_scale.parallel.tensor_parallel import gather_full, partition_of, shard
from star_scale.parallel.zero_state import (MOMENTS, ensure_optimizer_state, full_fp32, full_moment,
                                            link_optimizer_fragments, optimizer_step, set_full)


def layout_of(engine) -> dict:
    L = engine.layout
    return {"world": L.world, "tp": L.tp, "dp": L.dp, "zero_stage": engine.zero_stage,
            "dtype": str(engine.dtype).replace("torch.", "")}


def student_args(engine) -> dict:
    student = engine.module.student if hasattr(engine.module, "student") else engine.module
    return dataclasses.asdict(student.args)


def consolidate_student(engine) -> dict:
    """Whole TP = 1 fp32 weights of the training module (collective; on every rank)."""
    L = engine.layout
    return {name: gather_full(full_fp32(engine.ds, p), p, L.tp_group).cpu()
            for name, p in engine.module.named_parameters()}


def consolidate(engine) -> Optional[dict]:
    """Whole TP = 1 fp32 state; collective, returned on rank 0 (None elsewhere)."""
    L, keep = engine.layout, engine.layout.is_main
    link_optimizer_fragments(engine.ds)
    weights, moments = {}, {}
    for name, p in engine.module.named_parameters():
        w = gather_full(full_fp32(engine.ds, p), p, L.tp_group)
        m = {k: gather_full(full_moment(engine.ds, p, k), p, L.tp_group) for k in MOMENTS}
        if keep:
            weights[name] = w.cpu()
            moments[name] = {k: v.cpu() for k, v in m.items()}
    teacher = engine.teacher.full_state() if engine.teacher is not None else None
    if not keep:
        return None
    return {"format": CONSOLIDATED, "args": student_args(engine), "module": weights, "moments": moments,
            "optimizer_step": optimizer_step(engine.ds), "teacher": teacher, "layout": layout_of(engine)}


def load_consolidated(engine, state: dict) -> None:
    """Take this rank's shards of a consolidated state (any layout it came from)."""
    L = engine.layout
    step = int(state["optimizer_step"])
    ensure_optimizer_state(engine.ds, step)
    for name, p in engine.module.named_parameters():
        if name not in state["module"]:
            raise KeyError(f"consolidated checkpoint has no {name!r}")
        dim, stride = partition_of(p)
        local = shard(state["module"][name], dim, stride, L.tp_rank, L.tp)
        moments = {k: shard(state["moments"][name][k], dim, stride, L.tp_rank, L.tp) for k in MOMENTS}
        set_full(engine.ds, p, local, moments)
    if engine.teacher is not None:
        engine.teacher.load_full_state(state["teacher"], L.tp_rank, L.tp)
    engine.ds.global_steps = step
    engine.ds.global_samples = step * engine.cfg.data.global_batch
