"""Distributed checkpoints: atomic, verified, resumable on the same layout bit for bit, or on any other.

One checkpoint is one folder ``step_XXXXXXXX`` (``star_scale.train.checkpoint.CheckpointDir``
names, verification and pruning rules):

    ds/                 DeepSpeed's own files: student shards and optimizer partitions
    teacher/rank_R.pt   each rank's fp32 teacher partition (DeepSpeed cannot save an
                        engine without optimizer: rank 0 raises, the others hang)
    trainer/rank_R.pt   loader cursor, RNG states, mlflow run id: whatever the trainer passes
    consolidated.pt     whole TP = 1 fp32 weights, AdamW moments and step, teacher (rank 0)
    meta.json           layout, and every file's size and sha256; written last

Atomicity: everything goes to ``.tmp-step_XXXXXXXX``; rank 0 writes meta.json
and renames the folder only after every rank finished and fsynced, so a crash
at any point leaves the previous checkpoints untouched (``steps()`` ignores the
temporary folder; the next save removes it).  Loading verifies sizes and
checksums (split across ranks) and falls back to an older checkpoint with a
warning naming the damaged file.

Same layout (world, tp, ZeRO stage, precision): DeepSpeed's own load, exact.
Another layout (elastic): every rank reads consolidated.pt and takes its
shards.  The data loader resumes at the same epoch and step; which samples
each rank reads then follows the new layout's plan.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from star_scale.atomic import fsync_dir
from star_scale.parallel.consolidated import CONSOLIDATED, DISTRIBUTED, from_local
from star_scale.parallel.ds_files import refusal, verified_loads
from star_scale.parallel.tensor_parallel import gather_full, partition_of, shard
from star_scale.parallel.zero_state import (
    MOMENTS,
    ensure_optimizer_state,
    full_fp32,
    full_moment,
    link_optimizer_fragments,
    optimizer_step,
    set_full,
)
from star_scale.train.checkpoint import CheckpointDir
from star_scale.train.rng import fresh_rng_state
from star_scale.trust import RefusedFile
from star_scale.trust.load import load_torch

log = logging.getLogger(__name__)
FORMAT = DISTRIBUTED


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _digest(path: Path) -> dict:
    """Size and sha256; fsync on the way (DeepSpeed's own writes are not synced)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def layout_of(engine) -> dict:
    L = engine.layout
    return {"world": L.world, "tp": L.tp, "dp": L.dp, "zero_stage": engine.zero_stage,
            "dtype": str(engine.dtype).replace("torch.", "")}


# ---- consolidation -----------------------------------------------------------------
def consolidate_student(engine) -> dict:
    """Whole TP = 1 fp32 weights of the training module (collective; on every rank)."""
    L = engine.layout
    return {name: gather_full(full_fp32(engine.ds, p), p, L.tp_group).cpu()
            for name, p in engine.module.named_parameters()}


def consolidate(engine) -> Optional[dict]:
    """Whole TP = 1 fp32 state; collective, returned on rank 0 (None elsewhere)."""
    L, keep = engine.layout, engine.layout.is_main
    link_optimizer_fragments(engine.ds)
    module, weights, moments = {}, {}, {}
    for name, p in engine.module.named_parameters():
        w = gather_full(full_fp32(engine.ds, p), p, L.tp_group)
        m = {k: gather_full(full_moment(engine.ds, p, k), p, L.tp_group) for k in MOMENTS}
        if keep:
            weights[name] = w.cpu()
            moments[name] = {k: v.cpu() for k, v in m.items()}
    teacher = engine.teacher.full_state() if engine.teacher is not None else None
    if not keep:
        return None
    student = engine.module.student if hasattr(engine.module, "student") else engine.module
    module.update(format=CONSOLIDATED, args=dataclasses.asdict(student.args), module=weights, moments=moments,
                  optimizer_step=optimizer_step(engine.ds), teacher=teacher, layout=layout_of(engine))
    return module


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


# ---- save ----------------------------------------------------------------------------
def save(engine, ckpts: CheckpointDir, step: int, trainer_state: dict) -> Path:
    L = engine.layout
    final = ckpts.path(step)
    tmp = ckpts.root / f".tmp-{final.name}"
    if L.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.ds.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    _write(tmp / "trainer" / f"rank_{L.rank:05d}.pt", trainer_state)
    if engine.teacher is not None:
        _write(tmp / "teacher" / f"rank_{L.rank:05d}.pt", engine.teacher.shard_state())
    state = consolidate(engine)
    if L.is_main:
        _write(tmp / "consolidated.pt", state)
    dist.barrier()
    names = _broadcast(sorted(str(f.relative_to(tmp))[:-3] for f in tmp.rglob("*.pt")) if L.is_main else None)
    digests = {}
    for name in names[L.rank :: L.world]:  # checksums split across ranks
        digests[name] = _digest(tmp / f"{name}.pt")
    files = {k: v for part in _all_gather(digests) for k, v in part.items()}
    if L.is_main:
        meta = {"step": step, "format": FORMAT, "layout": layout_of(engine), "files": dict(sorted(files.items()))}
        with open(tmp / "meta.json", "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        for d in {(tmp / n).parent for n in names} | {tmp}:
            fsync_dir(d)
        if final.exists():  # re-saving a step (a stop signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpts.root)
        ckpts.prune(step)
    dist.barrier()
    return final


# ---- load ----------------------------------------------------------------------------
def _verify(d: Path, rank: int, world: int) -> Optional[str]:
    """None if the checkpoint is whole, else what is wrong, naming the file (collective)."""
    try:
        meta = json.loads((d / "meta.json").read_text())
        files = sorted(meta["files"].items())
    except (OSError, ValueError, KeyError) as e:
        return f"{d / 'meta.json'}: unreadable ({e})"
    problem = None
    for name, info in files[rank::world]:
        f = d / f"{name}.pt"
        if not f.is_file():
            problem = f"{f}: missing"
        elif f.stat().st_size != info["bytes"]:
            problem = f"{f}: {f.stat().st_size} bytes, expected {info['bytes']} (truncated?)"
        elif _digest(f)["sha256"] != info["sha256"]:
            problem = f"{f}: checksum mismatch (corrupted)"
        if problem:
            break
    found = [p for p in _all_gather(problem) if p]
    return found[0] if found else None


def _trainer_file_after_relayout(d: Path, old: dict, L) -> tuple[Path, bool]:
    """The trainer state a rank takes when the layout changed: (file, whether it needs fresh RNG streams).

    Loader cursors agree across ranks. RNG streams (dropout) must be shared by the
    ranks of one tensor-parallel group and differ across data-parallel ranks, as
    in an unbroken run: data-parallel rank d takes the streams of the old layout's
    data-parallel rank d (its first TP rank: ranks are dp_rank * tp + tp_rank),
    and a data-parallel rank the old layout did not have gets fresh streams
    from (seed, step, d).
    """
    if L.dp_rank < old["dp"]:
        return d / "trainer" / f"rank_{L.dp_rank * old['tp']:05d}.pt", False
    return d / "trainer" / f"rank_{0:05d}.pt", True


def load_latest(engine, ckpts: CheckpointDir) -> Optional[tuple[int, dict]]:
    """Restore the engine from the newest whole checkpoint; (step, this rank's trainer state) or None."""
    L = engine.layout
    for step in reversed(ckpts.steps()):
        d = ckpts.path(step)
        problem = _verify(d, L.rank, L.world)
        if problem:
            if L.is_main:
                log.warning("skipping damaged checkpoint: %s; falling back to an earlier one", problem)
            continue
        meta = json.loads((d / "meta.json").read_text())
        refused = [p for p in _all_gather(refusal(d, sorted(meta["files"])[L.rank::L.world])) if p]
        if refused:  # every rank stops here, together
            raise RefusedFile(*refused[0])
        if meta.get("format") != FORMAT:  # a single-process (LocalEngine) checkpoint
            if L.is_main:
                log.info("single-process checkpoint %s: loading it as a consolidated state", d)
            local = load_torch(d / "engine.pt")
            load_consolidated(engine, from_local(local, engine.module))
            del local
            trainer_state = load_torch(d / "trainer.pt")
            if L.dp_rank:  # one process had one stream: the other data-parallel ranks need their own
                trainer_state["rng"] = fresh_rng_state(engine.cfg.train.seed, step, L.dp_rank)
            return step, trainer_state
        old = meta["layout"]
        fresh = False
        if old == layout_of(engine):
            with verified_loads(engine.ds, d, meta["files"]):
                path, _ = engine.ds.load_checkpoint(str(d), tag="ds", load_optimizer_states=True,
                                                    load_lr_scheduler_states=False, load_module_strict=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {d / 'ds'}")
            if engine.teacher is not None:
                engine.teacher.load_shard_state(load_torch(d / "teacher" / f"rank_{L.rank:05d}.pt"))
            trainer_file = d / "trainer" / f"rank_{L.rank:05d}.pt"
        else:
            if L.is_main:
                log.info("checkpoint layout %s differs from this run's %s: loading the consolidated state", old,
                         layout_of(engine))
            state = load_torch(d / "consolidated.pt", mmap=True)
            load_consolidated(engine, state)
            del state
            trainer_file, fresh = _trainer_file_after_relayout(d, old, L)
        trainer_state = load_torch(trainer_file)
        if fresh:
            trainer_state["rng"] = fresh_rng_state(engine.cfg.train.seed, step, L.dp_rank)
        return step, trainer_state
    return None
