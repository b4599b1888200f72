"""The consolidated state: the one checkpoint form every engine and layout understands (torch only).

    {"format", "args", "module": {name: whole fp32 weight}, "moments": {name: {exp_avg, exp_avg_sq}},
     "optimizer_step", "teacher": {name: whole weight} | None, "layout"}

Names are the training module's at TP = 1 (``student.*``, ``projector.*``); the
teacher's are its GPT's.  A distributed checkpoint's shards assemble into one
(``from_shards``: offline, in one process, for export and for a one-process
resume); a single-process checkpoint (LocalEngine's module and torch optimizer
state dicts) converts to one and back, so a run can move between one process and
many in either direction.  Checkpoints of the first distributed format carry one
as ``consolidated.pt``.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

import torch
import torch.nn as nn

from star_scale.parallel.shard_files import KINDS, ShardReader
from star_scale.trust.load import load_torch

log = logging.getLogger(__name__)
CONSOLIDATED = "star-scale-consolidated-v1"
DISTRIBUTED = "star-scale-dist-v2"  # per-rank shards
DISTRIBUTED_V1 = "star-scale-dist-v1"  # DeepSpeed's files plus consolidated.pt
TEACHER = "teacher.model."  # the EMATeacher's GPT inside a training module


def _ndim(p: torch.Tensor) -> int:
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3 empties p.data


def optimizer_order(module: nn.Module) -> list[str]:
    """Trainable parameter names in torch AdamW's index order (``engine.param_groups``: matrices, then the rest)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad and not n.startswith(TEACHER)]
    return [n for n, p in named if _ndim(p) >= 2] + [n for n, p in named if _ndim(p) < 2]


def from_local(engine_state: dict, module: nn.Module) -> dict:
    """LocalEngine's {"module", "optimizer"} -> consolidated (``module`` gives the optimizer's name order)."""
    weights = {k: v.float() for k, v in engine_state["module"].items() if not k.startswith(TEACHER)}
    teacher = {k[len(TEACHER):]: v.float() for k, v in engine_state["module"].items() if k.startswith(TEACHER)}
    opt = engine_state["optimizer"]["state"]
    order = optimizer_order(module)
    moments, step = {}, 0
    for i, name in enumerate(order):
        s = opt.get(i, {})
        # A missing moment is zero: one stored zero seen in the weight's shape, not a whole tensor per rank.
        moments[name] = {k: s[k].float() if k in s else torch.zeros(()).expand(weights[name].shape)
                         for k in ("exp_avg", "exp_avg_sq")}
        step = max(step, int(s.get("step", 0)))
    return {"format": CONSOLIDATED, "module": weights, "moments": moments, "optimizer_step": step,
            "teacher": teacher or None, "layout": {"world": 1, "tp": 1}}


def is_distributed(meta: dict) -> bool:
    """Whether a checkpoint's meta.json is a distributed engine's (either format)."""
    return meta.get("format") in (DISTRIBUTED, DISTRIBUTED_V1)


def from_shards(folder, meta: dict) -> dict:
    """The consolidated state of a sharded distributed checkpoint (whole tensors: one process, offline)."""
    if meta.get("format") == DISTRIBUTED_V1:
        return load_torch(folder / "consolidated.pt", mmap=True)
    reader = ShardReader(folder, meta["layout"]["world"])
    try:
        whole = {kind: {n: reader.full(f"{kind}/{n}") for n in reader.names(kind)} for kind in KINDS}
    finally:
        reader.close()
    moments = {n: {k: whole[k][n] for k in ("exp_avg", "exp_avg_sq")} for n in whole["student"]}
    return {"format": CONSOLIDATED, "args": meta["args"], "module": whole["student"], "moments": moments,
            "optimizer_step": meta["optimizer_step"], "teacher": whole["teacher"] or None, "layout": meta["layout"]}


def to_local(state: dict, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a consolidated state into a single-process module and its torch AdamW."""
    weights = dict(state["module"])
    if state.get("teacher"):
        weights.update({TEACHER + k: v for k, v in state["teacher"].items()})
    module.load_state_dict(weights, strict=True)
    order = optimizer_order(module)
    device = next(module.parameters()).device
    fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    step = torch.tensor(float(state["optimizer_step"]), dtype=torch.float32, device=device if fused else "cpu")
    # Copies: torch's load_state_dict keeps tensors that already match, sharing them with ``state``.
    opt_state = {i: {"step": step.clone(), **{k: state["moments"][n][k].to(device, copy=True) for k in ("exp_avg", "exp_avg_sq")}}
                 for i, n in enumerate(order)}
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})


def load_latest_local(engine, ckpts) -> Optional[tuple[int, dict]]:
    """LocalEngine's resume: the newest whole checkpoint, single-process or distributed (any layout)."""
    for step in reversed(ckpts.steps()):
        problem = ckpts.verify(step)
        if problem:
            log.warning("skipping damaged checkpoint: %s; falling back to an earlier one", problem)
            continue
        d = ckpts.path(step)
        meta = json.loads((d / "meta.json").read_text())
        if is_distributed(meta):
            log.info("checkpoint layout %s: loading its shards into one process", meta["layout"])
            to_local(from_shards(d, meta), engine.module, engine.optimizer)
            return step, load_torch(d / "trainer" / "rank_00000.pt")
        engine.load_state_dict(load_torch(d / "engine.pt"))
        return step, load_torch(d / "trainer.pt")
    return None
