"""`star-scale repro`: the paper's loss ablation (Table 3) at a scale that runs on a CPU in under an hour.

One command, every stage resumable (re-running skips what is done):

1. data: the generated shape set (``demo_data``: 8 classes, position / scale /
   rotation / colour vary within a class; colours from an 8-colour palette by
   default), a training folder and a held-out
   validation folder drawn with another seed, both tokenized by the offline
   job (``tokenize_data``): patch-kmeans fitted on the training images, the
   validation images encoded with that same tokenizer file.
2. judge: a small CNN trained once on the decoded training tokens (all ten
   crops), cached in ``OUT/classifier.pt``; it scores generated samples
   (class accuracy) and its penultimate features give an FID against the
   decoded validation images.
3. runs: every recipe of ``recipes/repro/`` (baseline, +MIM, +MIM+step,
   +MIM+view, all three, and a control: the baseline's loss on both views,
   i.e. ST-AR's sequences per step) for every seed, each in its own process
   (``--jobs`` at a time), each written to ``OUT/runs/<config>-s<seed>/``
   and finished by ``result.json``; a run with a result is skipped, an
   interrupted run resumes from its last checkpoint.
4. table: mean +- sample std over seeds per config, and the paired difference
   to the baseline of the same seed, printed and written to ``OUT/table.md``
   with every run's numbers in ``OUT/results.json``.

Per run (all on the validation split): linear-probe top-1 of the middle layer
(null class, hidden states averaged over 8 uniformly spaced steps,
BatchNorm(affine=False) + linear head, ``star_scale.evaluate.probe``), next-token loss
(nats per token, centre crop, true labels), and generation quality: N samples
per class with fixed per-sample noise (identical for every model), without
CFG and with ``--cfg-scale``, scored by the judge's accuracy and by the FID of
its features against the validation reconstructions.

Slurm: ``star-scale repro --prepare-only`` once, then an array job with one
task per run (``star-scale repro --task $SLURM_ARRAY_TASK_ID``, ``--list``
prints the task -> run mapping), then ``star-scale repro`` prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from star_scale.demo.repro.judge import load_or_train_judge
from star_scale.demo.repro.plan import (
    CONFIGS,
    DATASET_OVERRIDES,
    RESULT_FILE,
    RESULT_KEYS,
    SETTINGS_FILE,
    _atomic_json,
    _atomic_text,
    default_recipes,
    grid,
    prepare_data,
    run_name,
)
from star_scale.demo.repro.run import run_one
from star_scale.demo.repro.table import make_table
from star_scale.trust.load import load_torch


# ---- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-scale repro", description=__doc__.split("\n\n")[0] + "\n\n" +
                                "\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.steps=20 (key.sub=value)")
    p.add_argument("--out", default="repro_out", help="output folder (default: repro_out); re-running resumes")
    p.add_argument("--recipes", default=None, help="folder with <config>.yaml recipes (default: the repo's recipes/repro)")
    p.add_argument("--configs", nargs="+", default=CONFIGS, help=f"configs to run (default: {' '.join(CONFIGS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--jobs", type=int, default=None, help="runs at once, one process each (default: min(2, cores))")
    p.add_argument("--dataset", choices=["shapes", "digits"], default="shapes",
                   help="shapes: generated shapes (default); digits: scikit-learn's real handwritten digits "
                        "(10 classes, a fixed 80/20 split: ~144 train / 36 val per class)")
    p.add_argument("--per-class", type=int, default=512, help="training images per class (default 512; digits: "
                                                               "at most the split's)")
    p.add_argument("--val-per-class", type=int, default=128, help="validation images per class (default 128)")
    p.add_argument("--palette", type=int, default=8, help="colours drawn from a palette of this many (default 8; "
                   "0: any RGB colour, the demo's default); see demo_data.draw_shape")
    p.add_argument("--clutter", type=int, default=3, help="random clutter lines per image (default 3)")
    p.add_argument("--classifier-epochs", type=int, default=20, help="epochs of the judge CNN (default 20)")
    p.add_argument("--samples-per-class", type=int, default=64, help="generated samples per class (default 64)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="CFG scale of the guided samples (default 2.0; "
                   "unguided samples are scored too)")
    p.add_argument("--sample-seed", type=int, default=1234, help="seed of the sampling noise (same for every model)")
    p.add_argument("--probe-epochs", type=int, default=20, help="linear-probe epochs (SGD; default 20)")
    p.add_argument("--prepare-only", action="store_true", help="make the data and the judge, then stop (before a Slurm array)")
    p.add_argument("--task", type=int, default=None, help="run only task i of --list (a Slurm array task), no table")
    p.add_argument("--list", action="store_true", help="print task index -> run, and exit")
    p.add_argument("--table-only", action="store_true", help="print the table of the finished runs (files untouched), train nothing")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: CONFIG:SEED in a worker process
    return p


def _recipes_sha(folder: Path, configs: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.yaml")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _settings(args, out: Path) -> dict:
    recipes = Path(args.recipes) if args.recipes else default_recipes()
    missing = [c for c in args.configs if not (recipes / f"{c}.yaml").is_file()]
    if missing:
        raise SystemExit(f"star-scale repro: no recipe {', '.join(f'{c}.yaml' for c in missing)} in {recipes} (--recipes)")
    jobs = args.jobs or max(1, min(2, os.cpu_count() or 1))
    return {
        "dataset": args.dataset, "dataset_overrides": DATASET_OVERRIDES[args.dataset],
        "per_class": args.per_class, "val_per_class": args.val_per_class, "seeds_data": [0, 1],
        "palette": args.palette, "clutter": args.clutter,
        "classifier_epochs": args.classifier_epochs, "samples_per_class": args.samples_per_class,
        "cfg_scale": args.cfg_scale, "sample_seed": args.sample_seed, "probe_epochs": args.probe_epochs,
        "overrides": list(args.overrides), "recipes": str(recipes.resolve()), "recipes_sha": _recipes_sha(recipes, args.configs),
        "jobs": jobs, "threads": max(1, (os.cpu_count() or 1) // jobs),
    }


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in RESULT_KEYS if old.get(k) != settings.get(k)]
        if changed and any((out / "runs").glob(f"*/{RESULT_FILE}")):
            raise SystemExit(f"star-scale repro: {out} holds results made with other settings "
                             f"({', '.join(f'{k}: {old.get(k)!r} -> {settings.get(k)!r}' for k in changed)}); "
                             f"use another --out or delete it")


def _launch(out: Path, config: str, seed: int) -> tuple[str, int, int, float]:
    run_dir = out / "runs" / run_name(config, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    threads = str(json.loads((out / SETTINGS_FILE).read_text())["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
    with open(run_dir / "log.txt", "a") as logf:
        rc = subprocess.call([sys.executable, "-m", "star_scale.demo.repro.cli", "--out", str(out), "--run", f"{config}:{seed}"],
                             stdout=logf, stderr=subprocess.STDOUT, env=env)
    return config, seed, rc, time.time() - t0


def collect(out: Path, configs: list[str], seeds: list[int]) -> list[dict]:
    results = []
    for c, s in grid(configs, seeds):
        path = out / "runs" / run_name(c, s) / RESULT_FILE
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def _line(r: dict, cfg_scale: float) -> str:
    g = r["generation"]
    gen = " ".join(f"acc@{v['cfg_scale']:g} {100 * v['accuracy']:.1f}% FID@{v['cfg_scale']:g} {v['fid']:.2f}"
                   for v in g.values())
    return (f"{r['run']}: probe {100 * r['probe_top1']:.1f}% val loss {r['val_loss']:.4f} {gen} "
            f"(train {r['train_seconds']:.0f}s, eval {r['eval_seconds']:.0f}s)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.run:  # a worker process: one run
        logging.basicConfig(level=os.environ.get("STAR_SCALE_LOG", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        config, seed = args.run.rsplit(":", 1)
        run_one(out, config, int(seed))
        return 0
    tasks = grid(args.configs, args.seeds)
    if args.list:
        for i, (c, s) in enumerate(tasks):
            print(f"{i}\t{run_name(c, s)}")
        return 0
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, out)
    if not args.table_only:
        _check_settings(out, settings)
        print(f"star-scale repro: {len(tasks)} runs ({len(args.configs)} configs x {len(args.seeds)} seeds) in {out}, "
              f"{settings['jobs']} at a time x {settings['threads']} threads", flush=True)
        data = prepare_data(out, args.per_class, args.val_per_class, tuple(settings["seeds_data"]),
                            palette=args.palette or None, clutter=args.clutter, dataset=args.dataset)
        settings["data"] = data
        _atomic_json(out / SETTINGS_FILE, settings)
        print(f"data: {data['train_images']} train / {data['val_images']} val images, {data['classes']} classes "
              f"({time.time() - t0:.0f}s)", flush=True)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        judge, info = load_or_train_judge(out, data, args.classifier_epochs, args.samples_per_class)
        print(f"judge: {100 * info['val_accuracy']:.1f}% val accuracy, real-vs-real FID "
              f"{info['fid_real_train_vs_val']:.2f} ({time.time() - t0:.0f}s)", flush=True)
        if args.prepare_only:
            return 0
        if args.task is not None:
            if not 0 <= args.task < len(tasks):
                raise SystemExit(f"star-scale repro: --task {args.task}: expected 0..{len(tasks) - 1} (--list)")
            tasks = [tasks[args.task]]
        todo = [(c, s) for c, s in tasks if not (out / "runs" / run_name(c, s) / RESULT_FILE).is_file()]
        if len(todo) < len(tasks):
            print(f"{len(tasks) - len(todo)} runs already done, {len(todo)} to go", flush=True)
        failed = []
        with ThreadPoolExecutor(max_workers=1 if args.task is not None else settings["jobs"]) as pool:
            futures = [pool.submit(_launch, out, c, s) for c, s in todo]
            for future in as_completed(futures):
                config, seed, rc, secs = future.result()
                if rc:
                    failed.append(run_name(config, seed))
                    print(f"{run_name(config, seed)}: FAILED (exit {rc}); see "
                          f"{out / 'runs' / run_name(config, seed) / 'log.txt'}", flush=True)
                else:
                    r = json.loads((out / "runs" / run_name(config, seed) / RESULT_FILE).read_text())
                    print(f"[{time.time() - t0:6.0f}s] {_line(r, args.cfg_scale)}", flush=True)
        if failed:
            print(f"star-scale repro: {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        if args.task is not None:
            return 0
    results = collect(out, args.configs, args.seeds)
    if not results:
        print(f"star-scale repro: no finished runs in {out}", file=sys.stderr)
        return 1
    judge_path = out / "classifier.pt"
    info = load_torch(judge_path)["info"]
    wall = None if args.table_only else time.time() - t0
    classes = json.loads((out / SETTINGS_FILE).read_text())["data"]["classes"]
    table = make_table(results, args.configs, args.seeds, args.cfg_scale, info, wall, classes)
    print()
    print(table, flush=True)
    if args.table_only:  # a look at the results: the files keep the last full invocation's table and wall time
        return 0
    _atomic_text(out / "table.md", table)
    _atomic_json(out / "results.json", {"settings": json.loads((out / SETTINGS_FILE).read_text()),
                                        "judge": info, "wall_seconds": wall, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
