"""Tokenize one unit (shard) of rows, in this process or in a pool of worker processes.

The pool uses the 'spawn' start method: ``_init_worker`` and ``_run_unit`` are pickled by reference
and resolve as ``tokenize_data.worker._init_worker`` / ``tokenize_data.worker._run_unit``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from star_scale.data import schema
from tokenize_data.images import SkipImage, load_rgb, ten_crops
from tokenize_data.plan import CROPS, JobError, Plan, _marker, _read_plan, _sha, _unit_lock
from tokenize_data.prepare import _tokenizer_for
from star_scale import atomic

# Testing aids (seconds): pause after a unit's data is written and before its done marker, and per image.
_PAUSE_BEFORE_MARK = "STAR_SCALE_TOKENIZE_PAUSE_BEFORE_MARK"
_PAUSE_PER_IMAGE = "STAR_SCALE_TOKENIZE_PAUSE_PER_IMAGE"


# ---- one unit ---------------------------------------------------------------------
class _Worker:
    def __init__(self, plan: Plan, tokenizer, batch_size: int, tick=None):
        import torch
        import zarr

        # the same codes on a re-run: no autotuned (run-to-run varying) convolution algorithms
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

        self.plan, self.tok, self.batch_size = plan, tokenizer, batch_size
        self._tick = tick or (lambda n: None)
        self.codes = zarr.open_array(str(plan.out / schema.CODES), mode="r+")
        self.labels = zarr.open_array(str(plan.out / schema.LABELS), mode="r+")
        self.pause_mark = float(os.environ.get(_PAUSE_BEFORE_MARK, "0") or 0)
        self.pause_image = float(os.environ.get(_PAUSE_PER_IMAGE, "0") or 0)

    def _clear(self, unit: int) -> None:
        for f in schema.shard_files(self.plan.out, unit):
            f.unlink(missing_ok=True)
            if f.parent.is_dir():
                for stray in f.parent.glob(f"{f.name}.*.partial"):
                    stray.unlink(missing_ok=True)

    def process(self, unit: int) -> dict:
        plan, attrs = self.plan, self.plan.attrs
        with _unit_lock(plan.out, unit) as locked:
            if not locked:
                return {"unit": unit, "status": "busy"}
            if plan.done(unit):
                return {"unit": unit, "status": "done-before"}
            t0 = time.time()
            self._clear(unit)  # a half-written unit is redone from scratch
            rows = plan.rows(unit)
            n, T = len(rows), int(attrs["tokens_per_image"])
            codes = np.zeros((n, CROPS, T), dtype=np.uint16)
            labels = np.full(n, schema.LABEL_SKIPPED, dtype=np.int32)
            skipped, converted = [], []
            pending_idx, pending_crops = [], []
            size, crop_range, min_side = int(attrs["image_size"]), float(attrs["crop_range"]), int(attrs["min_side"])

            def flush():
                if not pending_idx:
                    return
                enc = self.tok.encode(np.concatenate(pending_crops)).numpy().reshape(len(pending_idx), CROPS, T)
                if enc.size and (enc.min() < 0 or enc.max() >= int(attrs["codebook_size"])):
                    raise JobError(f"tokenizer produced codes outside [0, {attrs['codebook_size']})")
                codes[pending_idx] = enc
                pending_idx.clear()
                pending_crops.clear()

            ticks = 0
            for j, row in enumerate(rows):
                path = plan.abspath(row)
                try:
                    im, notes = load_rgb(path, min_side)
                    if min(im.size) < int(size * crop_range):
                        notes.append(f"upscaled from {im.size[0]}x{im.size[1]} (smaller than the {int(size * crop_range)} px crop)")
                    crops = ten_crops(im, size, crop_range)
                except SkipImage as e:
                    skipped.append({"row": row, "path": plan.paths[row], "reason": e.reason})
                else:
                    labels[j] = plan.labels[row]
                    if notes:
                        converted.append({"row": row, "path": plan.paths[row], "notes": notes})
                    pending_idx.append(j)
                    pending_crops.append(crops)
                    if len(pending_idx) >= self.batch_size:
                        flush()
                if self.pause_image:
                    time.sleep(self.pause_image)
                ticks += 1
                if ticks >= 16:
                    self._tick(ticks)
                    ticks = 0
            flush()
            self._tick(ticks)
            self.codes[rows.start: rows.stop] = codes
            self.labels[rows.start: rows.stop] = labels
            for f in schema.shard_files(plan.out, unit):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                    atomic.fsync_dir(f.parent)
            if self.pause_mark:
                time.sleep(self.pause_mark)
            info = {"unit": unit, "rows": [rows.start, rows.stop], "written": int((labels >= 0).sum()),
                    "skipped": skipped, "converted": converted,
                    "codes_sha256": _sha(codes), "labels_sha256": _sha(labels),
                    "tokenizer": attrs["tokenizer"]["weights_hash"]}
            atomic.write_text(_marker(plan.out, unit), json.dumps(info, indent=1))
            return {"unit": unit, "status": "written", "images": n, "seconds": time.time() - t0,
                    "skipped": len(skipped)}


# ---- worker processes -------------------------------------------------------------
_WORKER: _Worker | None = None


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: workers poll the parent instead
        pass


def _init_worker(out: str, tok_spec, device: str, batch_size: int, threads: int, counter, parent: int):
    global _WORKER
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(1)
    import multiprocessing as mp

    import torch

    torch.set_num_threads(max(1, threads))
    if device == "cuda" and torch.cuda.device_count() > 1:  # spread the workers over the node's GPUs
        ident = mp.current_process()._identity
        device = f"cuda:{(ident[0] - 1 if ident else 0) % torch.cuda.device_count()}"
    plan = _read_plan(Path(out))
    tok = _tokenizer_for(plan, tok_spec, device)

    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _WORKER = _Worker(plan, tok, batch_size, tick)


def _run_unit(unit: int) -> dict:
    return _WORKER.process(unit)
