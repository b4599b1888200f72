"""Run the job for one task: split units between tasks, tokenize this task's units, report when complete."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from star_scale.data import schema
from tokenize_data.plan import JobError, Plan
from tokenize_data.prepare import PATCH_SPEC, prepare
from tokenize_data.report import write_report
from tokenize_data.worker import _Worker, _init_worker, _run_unit


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
        from star_scale.console.progress import progress as progress_bar

        bar = progress_bar(total=images, unit="img", desc=f"tokenize {out.name}", disable=not progress)
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
