"""Distributed checkpoints: per-rank shards, atomic, verified, resumable on this layout bit for bit or on any other.

One checkpoint is one folder ``step_XXXXXXXX`` (``star_scale.train.checkpoint.CheckpointDir``
names, verification and pruning rules):

    shards/rank_R.bin   the fp32 masters, AdamW moments and teacher that rank R holds (raw data)
    shards/rank_R.json  their index: which range of which tensor, and how TP split it
    trainer/rank_R.pt   loader cursor, RNG states, mlflow run id: whatever the trainer passes
    meta.json           format, layout, model arguments, AdamW step, every file's size and sha256;
                        written last

Each rank writes and hashes only its own files; nothing is gathered on the save path, so the
bytes per rank fall as 1 / world (``parallel/shard_files.py`` has the format, ``parallel/pieces.py``
what each rank holds).  With ``train.async_save`` the pieces are copied to host memory and a
thread writes them while training goes on; the checkpoint is committed at a later step once every
rank's thread is done (or at the next save, a stop signal, or the end of training).  Whether every
rank is done is agreed every ``train.stop_check_every`` steps by an all-reduce read one agreement
later (``train.agreement``), so a pending save costs no per-step collective or device wait.

Atomicity: files go to ``.tmp-step_XXXXXXXX``; rank 0 writes meta.json and renames the folder only
after every rank reported its files written, fsynced and hashed, so a crash at any point leaves
the previous checkpoints untouched (the temporary folder is swept at the next start).  A rank
that fails to write (disk full, I/O error) tells the others at the commit, rank 0 removes the
temporary folder, and the job ends with one line naming the path and the bytes needed and free.

Loading verifies sizes and checksums (split across ranks), then every rank reads the pieces it
needs: on the same layout its own files; on another (world, TP size, ZeRO stage) the ranges of
other ranks' files that overlap its new partitions, one parameter at a time.  The data loader
resumes at the same epoch and step; which samples each rank reads then follows the new layout.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from star_scale.atomic import fsync_dir, torch_save, write_text
from star_scale.parallel.consolidated import DISTRIBUTED, from_local, is_distributed
from star_scale.parallel.pieces import collect, restore
from star_scale.parallel.shard_files import ShardReader, ShardWriter
from star_scale.parallel.whole_state import layout_of, load_consolidated, student_args
from star_scale.parallel.zero_state import optimizer_step
from star_scale.train.agreement import Agreement
from star_scale.train.checkpoint import CheckpointDir, digest, file_problem, listed_file
from star_scale.train.errors import CheckpointWriteError, checkpoint_write_error
from star_scale.train.rng import fresh_rng_state
from star_scale.trust import RefusedFile
from star_scale.trust.load import load_torch, refuse_code

log = logging.getLogger(__name__)
FORMAT = DISTRIBUTED


def _all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- save ----------------------------------------------------------------------------
class _Save:
    """One rank's share of one checkpoint: its files written (inline or in a thread), then the commit."""

    def __init__(self, ckpts: CheckpointDir, step: int, pieces: Optional[ShardWriter], trainer_state: dict, rank: int):
        self.ckpts, self.step, self.pieces, self.trainer_state, self.rank = ckpts, step, pieces, trainer_state, rank
        self.final = ckpts.path(step)
        self.tmp = ckpts.root / f".tmp-{self.final.name}"
        self.result: dict = {}
        self.adam_step = 0
        self.thread: Optional[threading.Thread] = None
        self.polls = 0  # poll() calls while pending: the same count on every rank
        self.agreement: Optional[Agreement] = None  # "some rank is still writing", launched at the last agreement

    def run(self) -> None:
        try:
            written = self.pieces.write(self.tmp, self.rank)
            trainer = f"trainer/rank_{self.rank:05d}.pt"
            torch_save(self.trainer_state, self.tmp / trainer)
            self.result = {"files": {name: digest(self.tmp / name) for name in [*written, trainer]}}
        except Exception as e:  # reported to every rank at the commit, so that all stop together
            self.result = {"error": str(checkpoint_write_error(self.final, e, self.ckpts.needed_bytes()))}
        finally:
            self.pieces = self.trainer_state = None  # the host snapshot goes as soon as it is on disk

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=f"checkpoint-{self.step}", daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


def _fail(engine, job: _Save, message: str) -> None:
    if engine.layout.is_main:
        shutil.rmtree(job.tmp, ignore_errors=True)
    raise CheckpointWriteError(message, quiet=not engine.layout.is_main)


def _commit(engine, job: _Save) -> Path:
    """Every rank's files are written (collective): rank 0 seals and renames the folder, or all fail as one."""
    if job.thread is not None:
        job.thread.join()
    results = _all_gather(job.result)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        _fail(engine, job, errors[0])
    problem = None
    if engine.layout.is_main:
        try:
            files = {k: v for r in results for k, v in r["files"].items()}
            meta = {"step": job.step, "format": FORMAT, "layout": layout_of(engine), "args": student_args(engine),
                    "optimizer_step": job.adam_step, "files": dict(sorted(files.items()))}
            write_text(job.tmp / "meta.json", json.dumps(meta, indent=1))
            for d in {(job.tmp / n).parent for n in files} | {job.tmp}:
                fsync_dir(d)
            if job.final.exists():  # re-saving a step (a stop signal right after a periodic save)
                shutil.rmtree(job.final)
            os.replace(job.tmp, job.final)
            fsync_dir(job.ckpts.root)
            job.ckpts.prune(job.step)
        except OSError as e:
            problem = str(checkpoint_write_error(job.final, e, job.ckpts.needed_bytes()))
    problem = _broadcast(problem)
    if problem:
        _fail(engine, job, problem)
    return job.final


def save(engine, ckpts: CheckpointDir, step: int, trainer_state: dict, asynchronous: bool = False) -> Optional[Path]:
    """Write checkpoint ``step`` (collective). Synchronous: committed on return. Asynchronous: see ``poll``."""
    wait(engine)  # an earlier asynchronous save is committed (or fails) first
    L = engine.layout
    job = _Save(ckpts, step, None, trainer_state, L.rank)
    problem = None
    if L.is_main:
        try:
            shutil.rmtree(job.tmp, ignore_errors=True)  # left by a crash mid-save
            job.tmp.mkdir(parents=True)
        except OSError as e:
            problem = str(checkpoint_write_error(job.final, e, ckpts.needed_bytes()))
    problem = _broadcast(problem)
    if problem:
        _fail(engine, job, problem)
    job.pieces = collect(engine)
    job.adam_step = optimizer_step(engine.ds)
    if not asynchronous:
        job.run()
        return _commit(engine, job)
    job.pieces = job.pieces.snapshot()  # training may change the originals from the next step on
    job.start()
    engine.pending_save = job
    return None


def poll(engine) -> Optional[Path]:
    """Commit a pending asynchronous save once every rank has written its files (collective, called every step).

    Every ``train.stop_check_every`` polls: commit if the agreement launched at the previous such poll
    says no rank was still writing, else launch the next one; the polls in between do nothing.
    """
    job = getattr(engine, "pending_save", None)
    if job is None:
        return None
    job.polls += 1
    if job.polls % engine.cfg.train.stop_check_every:
        return None
    if job.agreement is not None and job.agreement.read() == 0:
        engine.pending_save = None
        return _commit(engine, job)
    job.agreement = Agreement(int(not job.done()), engine.device)
    return None


def wait(engine) -> Optional[Path]:
    """Commit a pending asynchronous save, waiting for the writes (collective)."""
    job = getattr(engine, "pending_save", None)
    if job is None:
        return None
    engine.pending_save = None
    return _commit(engine, job)


# ---- load ----------------------------------------------------------------------------
def _verify(d: Path, rank: int, world: int) -> Optional[str]:
    """None if the checkpoint is whole, else what is wrong, naming the file (collective)."""
    try:
        meta = json.loads((d / "meta.json").read_text())
        files = sorted(meta["files"].items())
    except (OSError, ValueError, KeyError) as e:
        return f"{d / 'meta.json'}: unreadable ({e})"
    problem = next(filter(None, (file_problem(d, name, info) for name, info in files[rank::world])), None)
    found = [p for p in _all_gather(problem) if p]
    return found[0] if found else None


def _refusal(d: Path, names: list[str]) -> Optional[tuple[str, str]]:
    """(file, reason) if one of the listed torch files would run code when unpickled; reads no tensors.
    Checked on every rank before any loading, so a replaced file stops all ranks together."""
    for name in names:
        f = listed_file(d, name)
        if f.suffix == ".pt" and not name.startswith("ds/"):  # ds/: DeepSpeed's files of the old format, never read
            try:
                refuse_code(f)
            except RefusedFile as e:
                return e.path, e.reason
    return None


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


def _load_one(engine, d: Path, step: int, meta: dict) -> dict:
    """Restore the engine from verified folder ``d``; this rank's trainer state."""
    L = engine.layout
    if not is_distributed(meta):  # a single-process (LocalEngine) checkpoint
        if L.is_main:
            log.info("single-process checkpoint %s: loading it as a consolidated state", d)
        # Mapped, not read: every rank takes only its pieces, and the node holds one (page-cache) copy.
        load_consolidated(engine, from_local(load_torch(d / "engine.pt", mmap=True), engine.module))
        trainer_state = load_torch(d / "trainer.pt")
        if L.dp_rank:  # one process had one stream: the other data-parallel ranks need their own
            trainer_state["rng"] = fresh_rng_state(engine.cfg.train.seed, step, L.dp_rank)
        return trainer_state
    old = meta["layout"]
    if old != layout_of(engine) and L.is_main:
        log.info("checkpoint layout %s differs from this run's %s: resharding", old, layout_of(engine))
    if meta["format"] == FORMAT:
        reader = ShardReader(d, old["world"])
        try:
            restore(engine, reader, step, int(meta["optimizer_step"]))
        finally:
            reader.close()
    else:  # written before the sharded format: its consolidated.pt (mapped, as above), whatever the layout
        load_consolidated(engine, load_torch(d / "consolidated.pt", mmap=True))
    if old == layout_of(engine):
        return load_torch(d / "trainer" / f"rank_{L.rank:05d}.pt")
    trainer_file, fresh = _trainer_file_after_relayout(d, old, L)
    trainer_state = load_torch(trainer_file)
    if fresh:
        trainer_state["rng"] = fresh_rng_state(engine.cfg.train.seed, step, L.dp_rank)
    return trainer_state


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
        refused = [p for p in _all_gather(_refusal(d, sorted(meta["files"])[L.rank::L.world])) if p]
        if refused:  # every rank stops here, together
            raise RefusedFile(*refused[0])
        return step, _load_one(engine, d, step, meta)
    return None
