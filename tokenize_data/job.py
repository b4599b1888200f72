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

# The job lives in one module per responsibility; this module keeps every name importable from here:
#   plan.py     unit bookkeeping: markers, locks, checksums, the Plan
#   prepare.py  create or reuse the output store, tokenizer resolution, patch-kmeans fitting
#   worker.py   tokenize one unit (in this process or in spawned worker processes)
#   run.py      one task of the job: task split, run, the worker pool
#   report.py   report.json/report.txt and --verify
#   cli.py      the command line
import sys

from tokenize_data.cli import build_parser, main
from tokenize_data.plan import CROPS, JobError, Plan, _lockfile, _marker, _read_plan, _sha, _unit_lock
from tokenize_data.prepare import CROP_RECIPE, PATCH_SPEC, _fit_patch_tokenizer, _resolve_tokenizer, _tokenizer_for, prepare
from tokenize_data.report import verify, write_report
from tokenize_data.run import _run_pool, run, task_split
from tokenize_data.worker import (_PAUSE_BEFORE_MARK, _PAUSE_PER_IMAGE, _Worker, _die_with_parent, _init_worker,
                                  _run_unit)

__all__ = [
    "CROPS", "CROP_RECIPE", "PATCH_SPEC", "JobError", "Plan", "build_parser", "main", "prepare", "run", "task_split",
    "verify", "write_report",
    "_PAUSE_BEFORE_MARK", "_PAUSE_PER_IMAGE", "_Worker", "_die_with_parent", "_fit_patch_tokenizer", "_init_worker",
    "_lockfile", "_marker", "_read_plan", "_resolve_tokenizer", "_run_pool", "_run_unit", "_sha", "_tokenizer_for",
    "_unit_lock",
]


if __name__ == "__main__":
    sys.exit(main())
