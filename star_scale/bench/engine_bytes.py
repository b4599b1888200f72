"""Bytes a DeepSpeed engine really holds per rank, for `bench memory --state` and the plan's byte model.

``held(engine)``: the distinct tensor storages reachable from the engine (its module's
parameters and gradients, every tensor attribute of the ZeRO optimizer: flat weights,
fp32 masters, gradient partitions, reduce buckets, AdamW moments; the teacher) at one moment.
``Peak``: the most of those bytes held at once during a step (reduce buckets live only during
backward), and under ZeRO-3 the most bytes of gathered (whole) parameters alive at once.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _tensors(obj, seen: set, depth: int = 0):
    """Tensors reachable from ``obj`` through attributes, lists, tuples and dicts (not through modules)."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)) and type(obj).__module__.startswith(
            ("deepspeed", "torch.optim")):
        yield from _tensors(vars(obj), seen, depth + 1)


def storages(tensors) -> dict:
    """data_ptr -> bytes of each distinct non-empty storage."""
    out = {}
    for t in tensors:
        if t is not None and t.numel() and t.device.type != "meta":
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _module_tensors(model: nn.Module):
    for p in model.parameters():
        yield from (p.data, p.grad, getattr(p, "ds_tensor", None))


def held(engine) -> dict:
    """{'student': bytes of the student's engine (the training module), 'teacher': the teacher's} on this rank."""
    student = storages([*_module_tensors(engine.module), *_tensors(engine.ds.optimizer, set())])  # teacher taken out
    teacher = {}
    if engine.teacher is not None:
        t = engine.teacher
        extra = [*_tensors(t.engine.optimizer, set())] if getattr(t, "engine", None) is not None and t.engine.optimizer else []
        teacher = storages([*_module_tensors(t.model), *(getattr(t, "masters", None) or []), *extra])
        teacher = {k: v for k, v in teacher.items() if k not in student}
    return {"student": sum(student.values()), "teacher": sum(teacher.values())}


class Peak:
    """Peaks over one step, sampled before and after every module's forward and at every backward hook:
    ``held`` (as ``held()``, both engines) and ``gathered`` (bytes of whole ZeRO-3 parameters alive)."""

    def __init__(self, engine):
        self.engine = engine
        models = [engine.module] + ([engine.teacher.model] if engine.teacher is not None else [])
        self.params = [p for m in models for p in m.parameters() if hasattr(p, "ds_tensor")]
        self.held = self.gathered = 0
        self.handles = []

    def sample(self, *_):
        self.held = max(self.held, sum(held(self.engine).values()))
        self.gathered = max(self.gathered, sum(storages(p.data for p in self.params).values()))

    def __enter__(self):
        m = nn.modules.module
        self.handles = [m.register_module_forward_pre_hook(self.sample), m.register_module_forward_hook(self.sample),
                        m.register_module_full_backward_hook(self.sample)]
        return self

    def __exit__(self, *exc):
        self.sample()
        for h in self.handles:
            h.remove()


def compare_plan(overrides: list[str], n: int, ranks: list[dict]) -> str:
    """One line: the largest rank's measured peak beside `star-scale plan`'s byte model of the same config (CPU)."""
    from star_scale.config import load_config
    from star_scale.slurm.plan import count_params, estimate

    cfg = load_config(None, overrides, world_size=n)
    params = count_params(cfg)[0]
    measured = max(r["held_peak"] for r in ranks)
    planned = estimate(cfg, n, gpu=False, deepspeed=True).states()  # the bench runs DeepSpeed at N = 1 too
    return (f"state N={n}: measured {measured / 2**20:8.1f} MiB ({measured / params:.2f} B/param), plan "
            f"{planned / 2**20:8.1f} MiB ({planned / params:.2f} B/param), plan/measured {planned / measured:.3f}")
