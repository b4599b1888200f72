"""``star-scale tokenize``: images -> ten crops -> VQ codes -> one Zarr v3 token store.

Work is split into units of one shard each (``--shard-size`` rows).  Every
unit has exactly one writer: units are divided between Slurm array tasks
(``--task-id/--num-tasks`` or SLURM_ARRAY_TASK_ID/COUNT) by ``unit % tasks``,
and within a task between ``--workers`` processes; an flock per unit guards
against two runs of the same command at once.  A unit is done when its marker
``_tokenize/done/unit-NNNNNN.json`` exists, written atomically only after the
shard's data is written and fsync'ed.  Re-running the same command skips done
units and rewrites any other unit from scratch (its shard files deleted
first), so a job killed at any moment (kill -9 included) and re-run ends with
arrays identical to an uninterrupted run.

Rows: the source list (sorted folder scan, or the list file's order) is
permuted once with ``--row-seed`` so chunks mix classes; row i is line i of
``sources.tsv``.  A bad image keeps its row with label -1 (readers skip it)
and is listed, with the reason, in ``report.json``/``report.txt`` inside the
output, written once every unit is done.  ``--verify`` re-checks every shard.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from star_scale.data import schema
from tokenize_data.images import SkipImage, load_rgb, min_side_for, ten_crops
from tokenize_data.sources import SourceList, load_sources
from star_scale import atomic

CROPS = 10
CROP_RECIPE = ("ADM center_crop_arr to int(image_size*crop_range), then torchvision TenCrop(image_size): "
               "tl, tr, bl, br, center, then the same five of the horizontally flipped image")
PATCH_SPEC = "patch-kmeans"

# Testing aids (seconds): pause after a unit's data is written and before its done marker, and per image.
_PAUSE_BEFORE_MARK = "STAR_SCALE_TOKENIZE_PAUSE_BEFORE_MARK"
_PAUSE_PER_IMAGE = "STAR_SCALE_TOKENIZE_PAUSE_PER_IMAGE"


class JobError(RuntimeError):
    pass


# ---- small file helpers ------------------------------------------------------
def _marker(out: Path, unit: int) -> Path:
    return out / schema.JOB_DIR / "done" / f"unit-{unit:06d}.json"


def _lockfile(out: Path, unit: int) -> Path:
    return out / schema.JOB_DIR / "locks" / f"unit-{unit:06d}.lock"


@contextmanager
def _unit_lock(out: Path, unit: int):
    """Non-blocking flock (released by the kernel if the holder dies); yields False when another process holds it."""
    path = _lockfile(out, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:  # file system without flock: rely on the static unit split alone
            pass
        yield True
    finally:
        os.close(fd)


# ---- the plan -------------------------------------------------------------------
@dataclass
class Plan:
    out: Path
    attrs: dict
    paths: list  # row -> path (relative to root or absolute)
    labels: np.ndarray  # row -> label

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def shard_size(self) -> int:
        return int(self.attrs["shard_size"])

    @property
    def num_units(self) -> int:
        return -(-self.n // self.shard_size)

    def rows(self, unit: int) -> range:
        return range(unit * self.shard_size, min(self.n, (unit + 1) * self.shard_size))

    def abspath(self, row: int) -> str:
        p = self.paths[row]
        return p if os.path.isabs(p) else os.path.join(self.attrs["source"]["root"], p)

    def done(self, unit: int) -> bool:
        return _marker(self.out, unit).is_file()


def _read_plan(out: Path) -> Plan:
    import zarr

    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    if attrs.get("format") != schema.FORMAT:
        raise JobError(f"{out} is a Zarr group but not a star-scale token store")
    paths, labels = [], []
    with open(out / schema.SOURCES_FILE, encoding="utf-8") as f:
        for line in f:
            p, lab = line.rstrip("\n").rsplit("\t", 1)
            paths.append(p)
            labels.append(int(lab))
    if len(paths) != attrs["source"]["count"]:
        raise JobError(f"{out / schema.SOURCES_FILE}: {len(paths)} rows, attributes say {attrs['source']['count']}")
    return Plan(out, attrs, paths, np.asarray(labels, dtype=np.int64))


def _fit_patch_tokenizer(spec: str, sources: SourceList, image_size: int, crop_range: float, min_side: int,
                         fit_images: int, seed: int, log):
    from star_scale.tokenizer import PatchTokenizer

    k = int(spec.split(":", 1)[1]) if ":" in spec else 512
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sources))
    crops, used = [], 0
    t0 = time.time()
    for i in order:
        if used >= fit_images:
            break
        try:
            im, _ = load_rgb(sources.abspath(int(i)), min_side)
        except SkipImage:
            continue
        crops.append(ten_crops(im, image_size, crop_range))
        used += 1
    if not crops:
        raise JobError("no readable image to fit the patch tokenizer on")
    tok = PatchTokenizer.fit(np.concatenate(crops), codebook_size=k, patch=4, seed=seed)
    log(f"fitted {tok.name} on {used} images ({used * CROPS} crops) in {time.time() - t0:.1f}s")
    return tok


def _resolve_tokenizer(spec, *, device: str, image_size: int | None):
    from star_scale.tokenizer import Tokenizer, load_tokenizer

    if isinstance(spec, Tokenizer):
        return spec
    return load_tokenizer(spec, device=device, image_size=image_size)


def prepare(source, out: Path, *, tokenizer, image_size: int | None, crop_range: float | None, shard_size: int | None,
            chunk_size: int | None, row_seed: int | None, min_side: int | None, device: str, fit_images: int, seed: int,
            overwrite: bool, log) -> tuple[Plan, object]:
    """Create the output group once (atomically: built under a temporary name, then renamed), or reuse it.
    Options left None take their defaults when creating and are not checked when resuming."""
    from star_scale.tokenizer import Tokenizer

    out = Path(out)
    given = {"--crop-range": crop_range, "--row-seed": row_seed, "--min-side": min_side}
    if overwrite and out.exists():
        if not (schema.is_token_store(out) or (out.is_dir() and not any(out.iterdir()))):
            raise JobError(f"--overwrite: {out} exists and is not a token store; refusing to delete it")
        shutil.rmtree(out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    loaded = tokenizer if isinstance(tokenizer, Tokenizer) else None
    if not out.exists():
        if source is None:
            raise JobError(f"{out} does not exist: give the SOURCE folder or list file to create it")
        crop_range = 1.1 if crop_range is None else float(crop_range)
        row_seed = 0 if row_seed is None else int(row_seed)
        sources = load_sources(source)
        if len(sources) == 0:
            raise JobError(f"source {source} holds no image files")
        fitted = isinstance(tokenizer, str) and tokenizer.split(":", 1)[0] == PATCH_SPEC
        if fitted:
            size = image_size or 32
            tok = _fit_patch_tokenizer(tokenizer, sources, size, crop_range, min_side or min_side_for(size), fit_images,
                                       seed, log)
        else:
            tok = _resolve_tokenizer(tokenizer, device=device, image_size=image_size)
        if image_size is not None and image_size != tok.image_size:
            raise JobError(f"--image-size {image_size} but the tokenizer {tok.name} works on {tok.image_size} px images")
        loaded = tok
        size = tok.image_size
        min_side = min_side or min_side_for(size)
        n = len(sources)
        shard_size, chunk_size = schema.default_chunking(n, CROPS, tok.tokens_per_image, shard_size, chunk_size)
        order = np.arange(n) if row_seed < 0 else np.random.default_rng(row_seed).permutation(n)
        keep_copy = fitted or isinstance(tokenizer, Tokenizer) or tok.kind == "patch_kmeans"
        if keep_copy:
            tok_file = schema.TOKENIZER_FILE
        else:  # the big VQ weights stay where they are; the store records where (and their hash)
            tok_file = str(Path(str(tokenizer)).resolve()) if Path(str(tokenizer)).exists() else str(tokenizer)
        attrs = {
            "tokenizer": {**tok.describe(), "file": tok_file, "fitted": bool(fitted)},
            "image_size": size, "grid_size": tok.grid_size, "tokens_per_image": tok.tokens_per_image,
            "codebook_size": tok.codebook_size, "crops": CROPS, "crop_range": crop_range, "crop_recipe": CROP_RECIPE,
            "min_side": min_side, "num_classes": sources.num_classes, "class_names": sources.class_names,
            "source": {"kind": sources.kind, "root": sources.root, "list_file": sources.list_file, "count": n,
                       "sha256": sources.sha256(), "rows_file": schema.SOURCES_FILE,
                       "row_order": "as listed" if row_seed < 0 else f"permuted with numpy default_rng({row_seed})",
                       "row_seed": row_seed},
            "shard_size": shard_size, "chunk_size": chunk_size, "num_units": -(-n // shard_size),
            "label_skipped": schema.LABEL_SKIPPED, "label_unwritten": schema.LABEL_UNWRITTEN,
        }
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            schema.create_token_group(tmp, n, CROPS, tok.tokens_per_image, shard_size=shard_size, chunk_size=chunk_size,
                                      attrs=attrs)
            with open(tmp / schema.SOURCES_FILE, "w", encoding="utf-8") as f:
                for i in order:
                    f.write(f"{sources.paths[i]}\t{sources.labels[i]}\n")
            if keep_copy:
                tok.save(tmp / schema.TOKENIZER_FILE)
            atomic.write_text(tmp / schema.JOB_DIR / "plan.json",
                          json.dumps({"ignored": sources.ignored, "created_by": f"{socket.gethostname()}:{os.getpid()}"}, indent=1))
            (tmp / schema.JOB_DIR / "done").mkdir(parents=True, exist_ok=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, out)
                atomic.fsync_dir(out.parent)
                log(f"created {out}: {n} images, {len(sources.ignored)} ignored files, {attrs['num_units']} units of "
                    f"{shard_size} rows (chunks of {chunk_size}), tokenizer {tok.name}")
            except OSError:
                if not schema.is_token_store(out):
                    raise
                log(f"{out} was created by another task meanwhile; using it")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if not schema.is_token_store(out):
        raise JobError(f"{out} exists and is not a star-scale token store (use a new output path)")
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a creator killed mid-way (an hour is plenty)
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    plan = _read_plan(out)
    tok = _tokenizer_for(plan, loaded if loaded is not None else tokenizer, device)
    if image_size is not None and image_size != plan.attrs["image_size"]:
        raise JobError(f"{out} was made for {plan.attrs['image_size']} px images, not --image-size {image_size}")
    recorded_opts = {"--shard-size": plan.attrs["shard_size"], "--chunk-size": plan.attrs["chunk_size"],
                     "--crop-range": plan.attrs["crop_range"], "--row-seed": plan.attrs["source"]["row_seed"],
                     "--min-side": plan.attrs["min_side"]}
    given.update({"--shard-size": shard_size, "--chunk-size": chunk_size})
    for name, have in recorded_opts.items():
        if given.get(name) is not None and given[name] != have:
            raise JobError(f"{out} was made with {name} {have}, not {given[name]}: re-run with the same arguments or a new output")
    recorded = plan.attrs["source"]
    if source is not None and Path(source).is_dir() and str(Path(source).resolve()) != recorded["root"]:
        raise JobError(f"{out} was made from the folder {recorded['root']}, not {Path(source).resolve()}")
    if source is not None and Path(source).is_file() and str(Path(source).resolve()) != recorded.get("list_file"):
        raise JobError(f"{out} was made from {recorded.get('list_file') or recorded['root']}, not {Path(source).resolve()}")
    return plan, tok


def _tokenizer_for(plan: Plan, spec, device: str):
    """The tokenizer of an existing store; a given one must have the recorded weights hash."""
    from star_scale.tokenizer import Tokenizer, load_tokenizer

    rec = plan.attrs["tokenizer"]
    own = plan.out / schema.TOKENIZER_FILE
    if isinstance(spec, Tokenizer):
        tok = spec
    elif spec is not None and not str(spec).startswith(PATCH_SPEC):
        tok = load_tokenizer(spec, device=device, image_size=plan.attrs["image_size"])
    elif own.is_file():
        tok = load_tokenizer(own, device=device, image_size=plan.attrs["image_size"])
    else:
        tok = load_tokenizer(rec["file"], device=device, image_size=plan.attrs["image_size"])
    if tok.weights_hash != rec["weights_hash"]:
        raise JobError(f"{plan.out} was made with tokenizer {rec['name']} (weights {rec['weights_hash'][:12]}); "
                       f"{tok.name} has weights {tok.weights_hash[:12]}. Use the same tokenizer or a new output.")
    return tok


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


def _sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


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


# ---- the job ------------------------------------------------------------------------
def task_split(task_id: int | None, num_tasks: int | None) -> tuple[int, int]:
    """(task_id, num_tasks) from the arguments, else from Slurm array variables, else (0, 1)."""
    env = os.environ
    if task_id is None and num_tasks is None and "SLURM_ARRAY_TASK_ID" in env:
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise JobError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: pass --task-id and --num-tasks")
        task_id = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        num_tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
    task_id = 0 if task_id is None else int(task_id)
    num_tasks = 1 if num_tasks is None else int(num_tasks)
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise JobError(f"task {task_id} is not in [0, num_tasks={num_tasks})")
    return task_id, num_tasks


def run(source, out, *, tokenizer=None, image_size: int | None = None, crop_range: float | None = None,
        shard_size: int | None = None, chunk_size: int | None = None, workers: int = 1, task_id: int | None = None,
        num_tasks: int | None = None, batch_size: int = 64, device: str = "cpu", row_seed: int | None = None,
        min_side: int | None = None,
        fit_images: int = 2048, seed: int = 0, progress: bool = True, overwrite: bool = False, prepare_only: bool = False,
        log=None) -> dict:
    """Tokenize ``source`` (ImageNet-layout folder or list file) into the token store ``out``; resumable.

    ``tokenizer``: a path (our tokenizer file or LlamaGen's vq_ds16_c2i.pt), ``"vq16"``, a Tokenizer
    instance, or ``"patch-kmeans[:K]"`` to fit the small CPU tokenizer on the source images (stored in
    the output).  Returns a summary dict (``complete`` is True once every unit of every task is done).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    task_id, num_tasks = task_split(task_id, num_tasks)
    if int(workers) > 1 and not str(device).startswith("cpu"):
        device_main = "cpu"  # the workers hold the tokenizer on the accelerator; this process only checks its hash
    else:
        device_main = device
    plan, tok = prepare(source, out, tokenizer=tokenizer, image_size=image_size, crop_range=crop_range,
                        shard_size=shard_size, chunk_size=chunk_size, row_seed=row_seed, min_side=min_side,
                        device=device_main, fit_images=fit_images, seed=seed, overwrite=overwrite, log=log)
    if prepare_only:
        done = sum(plan.done(u) for u in range(plan.num_units))
        log(f"{out}: prepared, {plan.num_units} units ({done} done)")
        return {"out": str(out), "units": plan.num_units, "units_done": done, "complete": done == plan.num_units,
                "written_units": 0, "images": 0, "seconds": 0.0, "busy": []}
    mine = [u for u in range(plan.num_units) if u % num_tasks == task_id]
    todo = [u for u in mine if not plan.done(u)]
    images = sum(len(plan.rows(u)) for u in todo)
    if len(mine) != len(todo):
        log(f"task {task_id}/{num_tasks}: {len(mine) - len(todo)} of {len(mine)} units already done, {len(todo)} to do")
    t0 = time.time()
    results = []
    if todo:
        from tqdm import tqdm

        bar = tqdm(total=images, unit="img", desc=f"tokenize {out.name}", disable=not progress, smoothing=0.1,
                   dynamic_ncols=True, file=sys.stderr)
        workers = max(1, min(int(workers), len(todo)))
        if workers == 1:
            worker = _Worker(plan, tok, batch_size, bar.update)
            for u in todo:
                results.append(worker.process(u))
        else:
            results = _run_pool(plan, tokenizer, tok, device, batch_size, workers, todo, bar)
        bar.close()
    dt = time.time() - t0
    written = [r for r in results if r["status"] == "written"]
    busy = [r["unit"] for r in results if r["status"] == "busy"]
    n_img = sum(r["images"] for r in written)
    if written:
        log(f"task {task_id}/{num_tasks}: {len(written)} units, {n_img} images in {dt:.1f}s "
            f"({n_img / max(dt, 1e-9):.0f} images/s), {sum(r['skipped'] for r in written)} skipped")
    if busy:
        log(f"units {busy} are being written by another process right now; re-run later to check they finished")
    done = sum(plan.done(u) for u in range(plan.num_units))
    complete = done == plan.num_units
    summary = {"out": str(out), "units": plan.num_units, "units_done": done, "complete": complete,
               "written_units": len(written), "images": n_img, "seconds": dt, "busy": busy}
    if complete:
        rep = write_report(out)
        summary.update(skipped=rep["skipped_count"], ignored=rep["ignored_count"], converted=rep["converted_count"])
        log(f"{out}: complete, {rep['written']} of {rep['rows']} images tokenized, {rep['skipped_count']} skipped, "
            f"{rep['ignored_count']} ignored, {rep['converted_count']} converted (see {out / schema.REPORT_TXT})")
    else:
        log(f"{out}: {done} of {plan.num_units} units done (other tasks, or a re-run, finish the rest)")
    return summary


def _run_pool(plan: Plan, tok_spec, tok, device, batch_size, workers, todo, bar) -> list:
    import multiprocessing as mp

    from star_scale.tokenizer import Tokenizer

    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    spec = str(plan.out / schema.TOKENIZER_FILE) if (plan.out / schema.TOKENIZER_FILE).is_file() else \
        (tok_spec if not isinstance(tok_spec, Tokenizer) and not str(tok_spec).startswith(PATCH_SPEC) else plan.attrs["tokenizer"]["file"])
    threads = max(1, (os.cpu_count() or 1) // workers)
    results = []
    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(str(plan.out), spec, device, batch_size, threads, counter, os.getpid())) as pool:
        pending = pool.imap_unordered(_run_unit, todo, chunksize=1)
        seen = 0
        while len(results) < len(todo):
            try:
                results.append(pending.next(timeout=0.2))
            except mp.TimeoutError:
                pass
            value = counter.value
            bar.update(value - seen)
            seen = value
        bar.update(counter.value - seen)
    return results


# ---- report and verification --------------------------------------------------------
def write_report(out: Path) -> dict:
    """Collect every unit's skips and conversions into report.json and report.txt (deterministic content)."""
    plan = _read_plan(out)
    skipped, converted, written = [], [], 0
    for u in range(plan.num_units):
        info = json.loads(_marker(out, u).read_text())
        skipped += info["skipped"]
        converted += info["converted"]
        written += info["written"]
    plan_extra = json.loads((out / schema.JOB_DIR / "plan.json").read_text())
    ignored = plan_extra.get("ignored", [])
    skipped.sort(key=lambda d: d["row"])
    converted.sort(key=lambda d: d["row"])
    rep = {"complete": True, "rows": plan.n, "written": written, "skipped_count": len(skipped),
           "ignored_count": len(ignored), "converted_count": len(converted),
           "skipped": skipped, "ignored": ignored, "converted": converted,
           "source_root": plan.attrs["source"]["root"]}
    lines = [f"token store {out.name}: {written} of {plan.n} images tokenized; {len(skipped)} skipped, "
             f"{len(ignored)} ignored (not images), {len(converted)} converted",
             f"source root: {plan.attrs['source']['root']}", ""]
    lines += [f"SKIPPED\t{d['path']}\t{d['reason']}" for d in skipped]
    lines += [f"IGNORED\t{d['path']}\t{d['reason']}" for d in ignored]
    lines += [f"CONVERTED\t{d['path']}\t{'; '.join(d['notes'])}" for d in converted]
    atomic.write_text(out / schema.REPORT_JSON, json.dumps(rep, indent=1) + "\n")
    atomic.write_text(out / schema.REPORT_TXT, "\n".join(lines) + "\n")
    return rep


def verify(out, *, print_report: bool = True) -> dict:
    """Check every shard: shapes, code range, label range and agreement with sources.tsv, no unwritten rows,
    skipped rows as the unit's marker says, data checksums as written.  Returns a dict with ``ok``."""
    import zarr

    out = Path(out)
    problems: list[str] = []
    if not schema.is_token_store(out):
        res = {"ok": False, "problems": [f"{out} is not a star-scale token store"]}
        if print_report:
            print(f"verify {out}: FAILED\n  {res['problems'][0]}")
        return res
    plan = _read_plan(out)
    a = plan.attrs
    g = zarr.open_group(str(out), mode="r")
    codes_arr, labels_arr = g[schema.CODES], g[schema.LABELS]
    T, K, C = int(a["tokens_per_image"]), int(a["codebook_size"]), a.get("num_classes")
    if codes_arr.shape != (plan.n, CROPS, T) or codes_arr.dtype != np.uint16:
        problems.append(f"codes: shape {codes_arr.shape} {codes_arr.dtype}, expected {(plan.n, CROPS, T)} uint16")
    if labels_arr.shape != (plan.n,) or labels_arr.dtype != np.int32:
        problems.append(f"labels: shape {labels_arr.shape} {labels_arr.dtype}, expected {(plan.n,)} int32")
    units_ok = missing = 0
    valid = skipped = 0
    if not problems:
        for u in range(plan.num_units):
            rows = plan.rows(u)
            lab = labels_arr[rows.start: rows.stop]
            cod = codes_arr[rows.start: rows.stop]
            unwritten = int((lab == schema.LABEL_UNWRITTEN).sum())
            bad = []
            if not plan.done(u):
                missing += 1
                bad.append("not done (no marker)" + (f", {unwritten} unwritten rows" if unwritten else ""))
            else:
                info = json.loads(_marker(out, u).read_text())
                if unwritten:
                    bad.append(f"{unwritten} unwritten rows")
                if cod.size and int(cod.max()) >= K:
                    bad.append(f"codes up to {int(cod.max())} >= codebook size {K}")
                good = lab >= 0
                if C is not None and good.any() and int(lab[good].max()) >= int(C):
                    bad.append(f"label {int(lab[good].max())} >= num_classes {C}")
                if ((lab < 0) & (lab != schema.LABEL_SKIPPED) & (lab != schema.LABEL_UNWRITTEN)).any():
                    bad.append("labels below -1")
                if not np.array_equal(lab[good], plan.labels[rows.start: rows.stop][good]):
                    bad.append("labels differ from sources.tsv")
                sk_rows = sorted(d["row"] - rows.start for d in info["skipped"])
                if sk_rows != np.flatnonzero(lab == schema.LABEL_SKIPPED).tolist():
                    bad.append("skipped rows differ from the unit's report")
                if (cod[lab == schema.LABEL_SKIPPED] != 0).any():
                    bad.append("skipped rows hold codes")
                if info.get("codes_sha256") != _sha(cod) or info.get("labels_sha256") != _sha(lab):
                    bad.append("data checksum differs from what was written (corrupt or overwritten shard)")
                valid += int(good.sum())
                skipped += int((lab == schema.LABEL_SKIPPED).sum())
            if bad:
                problems.append(f"unit {u} rows [{rows.start}, {rows.stop}): " + "; ".join(bad))
            else:
                units_ok += 1
    strays = sorted(str(p.relative_to(out)) for p in out.rglob("*.partial"))
    if strays:
        problems.append(f"{len(strays)} stray partial files (interrupted writes), e.g. {strays[0]}")
    res = {"ok": not problems, "units": plan.num_units, "units_ok": units_ok, "units_missing": missing, "rows": plan.n,
           "valid": valid, "skipped": skipped, "problems": problems}
    if not problems and not (out / schema.REPORT_JSON).is_file():
        write_report(out)
    if print_report:
        status = "OK" if res["ok"] else "FAILED"
        print(f"verify {out}: {status}")
        print(f"  units {units_ok}/{plan.num_units} ok, {missing} not done; rows {plan.n}: {valid} tokenized, {skipped} skipped")
        print(f"  codes (N={plan.n}, {CROPS}, T={T}) uint16 < {K}; labels in [-1, {C}); shards of {a['shard_size']}, "
              f"chunks of {a['chunk_size']}; tokenizer {a['tokenizer']['name']} ({a['tokenizer']['weights_hash'][:12]})")
        for p in problems[:50]:
            print(f"  PROBLEM {p}")
        if len(problems) > 50:
            print(f"  ... {len(problems) - 50} more problems")
    return res


# ---- command line ----------------------------------------------------------------------
def build_parser(prog: str = "star-scale tokenize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize images offline (LlamaGen recipe: 1.1x centre crop, ten crops, VQ codes) into a Zarr v3 "
                    "token store. Resumable: re-run the same command after any interruption.",
        epilog="examples:\n"
               "  star-scale tokenize data/train out/train.zarr --tokenizer vq_ds16_c2i.pt --image-size 256 --workers 8\n"
               "  star-scale tokenize demo_images out/demo.zarr --tokenizer patch-kmeans --image-size 32\n"
               "  sbatch --array=0-63 ... star-scale tokenize data/train out/train.zarr --tokenizer vq16 --device cuda\n"
               "  star-scale tokenize --verify out/train.zarr\n")
    p.add_argument("paths", nargs="*", metavar="SOURCE OUT",
                   help="SOURCE: ImageNet-layout folder (one sub-folder per class) or a list file (path<TAB>label per line); "
                        "OUT: the Zarr group to write. With --verify only OUT is needed.")
    p.add_argument("--verify", action="store_true", help="check every shard of OUT and print a report (after the job, if SOURCE is given)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file (star-scale tokenizer or LlamaGen vq_ds16_c2i.pt), 'vq16' (weights from $STAR_SCALE_VQ16), "
                        "or 'patch-kmeans[:K]' to fit the small CPU tokenizer on the images (default K=512). "
                        "Not needed to resume an existing OUT.")
    p.add_argument("--image-size", type=int, default=None, help="crop size in pixels (default: the tokenizer's; 32 for patch-kmeans)")
    p.add_argument("--crop-range", type=float, default=None, help="centre crop to this many times the image size before the ten crops (default 1.1)")
    p.add_argument("--shard-size", type=int, default=None, help=f"rows per shard = unit of work (default {schema.DEFAULT_SHARD_SIZE})")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per inner chunk = the loader's read unit (default ~4 MiB)")
    p.add_argument("--workers", type=int, default=1, help="worker processes in this task (default 1)")
    p.add_argument("--task-id", type=int, default=None, help="this task's index (default $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of tasks sharing the job (default $SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per tokenizer call (x10 crops)")
    p.add_argument("--device", default=None, help="torch device for the tokenizer (default: cuda if available, else cpu)")
    p.add_argument("--row-seed", type=int, default=None, help="seed of the fixed row permutation (default 0; -1: keep the source order)")
    p.add_argument("--min-side", type=int, default=None, help="skip images whose shorter side is below this (default image_size/2)")
    p.add_argument("--fit-images", type=int, default=2048, help="images to fit patch-kmeans on")
    p.add_argument("--seed", type=int, default=0, help="seed for fitting patch-kmeans")
    p.add_argument("--overwrite", action="store_true", help="delete an existing OUT token store first")
    p.add_argument("--prepare-only", action="store_true",
                   help="create OUT (scan the source, fit patch-kmeans) and exit: run once before a large Slurm array")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify and len(args.paths) == 1:
        return 0 if verify(args.paths[0])["ok"] else 1
    if len(args.paths) != 2:
        parser.error("expected SOURCE OUT (or --verify OUT)")
    source, out = args.paths
    if args.tokenizer is None and not schema.is_token_store(out):
        parser.error("--tokenizer is required to create a new token store")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        summary = run(source, out, tokenizer=args.tokenizer, image_size=args.image_size, crop_range=args.crop_range,
                      shard_size=args.shard_size, chunk_size=args.chunk_size, workers=args.workers, task_id=args.task_id,
                      num_tasks=args.num_tasks, batch_size=args.batch_size, device=device, row_seed=args.row_seed,
                      min_side=args.min_side, fit_images=args.fit_images, seed=args.seed, progress=not args.no_progress,
                      overwrite=args.overwrite, prepare_only=args.prepare_only)
    except (JobError, FileNotFoundError, ValueError) as e:
        print(f"star-scale tokenize: error: {e}", file=sys.stderr)
        return 2
    if args.verify:
        return 0 if verify(out)["ok"] else 1
    return 3 if summary["busy"] else 0


if __name__ == "__main__":
    sys.exit(main())
