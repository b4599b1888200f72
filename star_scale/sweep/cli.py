"""`star-scale sweep plan|submit|fit`: scaling-law sweeps on Slurm, tracked in one mlflow experiment.

A sweep file (YAML) names a base recipe and either a grid of model sizes x
token budgets or compute budgets x model sizes:

    name: tiny                      # default: the file's stem
    base: ../tiny-ar.yaml           # recipe, relative to this file
    overrides: {train.log_every: 5} # config overrides for every run (mapping or list of key=value)
    tracking: {uri: null, experiment: null}  # default: sqlite in the sweep folder; experiment = name
    out: sweeps/{name}              # the sweep folder (relative to the working directory)
    flops: 6ND                      # C = 6 N D, or `model`: the model's training FLOPs per token x D
    max_parallel: null              # at most this many array tasks at once (sbatch --array=0-7%2)
    grid:                           # either a grid ...
      sizes: {s: {model.width: 32, model.layers: 1, model.heads: 2}, m: {model.width: 64}}  # null drops one
      tokens: [20000, 40000]        # D per run; train.steps = round(D / tokens per step)  (or steps: [...])
    compute:                        # ... or compute budgets (isoFLOP): D = C / 6N per size
      budgets: [1e11, 3e11]
      sizes: {...}
    fit: {metric: loss, tail: 0.1, bootstrap: 200, huber_delta: 1.0e-3, params: total, level: 0.95}

`plan` expands it into runs and writes the sweep folder (tasks/i.args: the
base recipe and overrides of run i); `submit` sends them as one Slurm array
under one mlflow experiment created beforehand (tasks get its id and a
`sweep` tag); `fit` reads the runs back from mlflow and fits
L(N, D) = E + A/N^a + B/D^b plus the compute-optimal N(C), D(C) (star_scale.sweep.scaling).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from star_scale.config import ConfigError
from star_scale.sweep.common import SweepError
from star_scale.sweep.fit import fit_sweep
from star_scale.sweep.spec import FIT_DEFAULTS, check_fit_options, load_sweep, plan_table, read_state, write_plan
from star_scale.sweep.submit import submit_sweep
from star_scale.trust.credentials import take_credentials

EXAMPLES = """examples:
  star-scale sweep plan recipes/sweeps/tiny.yaml                 # table + sweeps/tiny/tasks/*.args
  star-scale sweep submit recipes/sweeps/tiny.yaml --dry-run     # print the array script
  star-scale sweep submit recipes/sweeps/tiny.yaml data.path=demo_out/tokens.zarr --set grid.tokens=[1e5,4e5]
  star-scale sweep fit sweeps/tiny                               # sweeps/tiny/fit/: fit.md, runs.csv, *.png
"""


def _add_sweep_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("sweep", help="sweep file (YAML; see `star-scale sweep --help`)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, key.sub=value "
                    "(e.g. data.path=... cluster.gpus_per_node=0)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="change the sweep file's own keys, e.g. --set grid.tokens=[4096,8192] --set name=try2")
    ap.add_argument("--out", help="sweep folder (default: the file's out:, else sweeps/NAME)")


def _resolve_for_fit(args) -> tuple[dict, Path]:
    """(settings, sweep folder) from a sweep folder (its sweep.json) or a sweep file."""
    target = Path(args.sweep)
    if target.is_dir():
        state = read_state(target)
        if not state:
            raise SweepError(f"{target}: no sweep.json: not a sweep folder (run `star-scale sweep plan` first)")
        return state, target
    sweep = load_sweep(target, args.overrides, args.sets, args.out)
    state = sweep.to_dict()
    state.update({k: v for k, v in read_state(sweep.dir).items() if k == "experiment_id"})
    return state, sweep.dir


def cmd_plan(args) -> int:
    sweep = load_sweep(args.sweep, args.overrides, args.sets, args.out)
    print(plan_table(sweep))
    write_plan(sweep)
    print(f"wrote {sweep.dir}/tasks/0..{len(sweep.runs) - 1}.args ({len(sweep.runs)} runs)")
    return 0


def cmd_submit(args) -> int:
    from star_scale.slurm.submit import cluster_overrides

    sweep = load_sweep(args.sweep, [*args.overrides, *cluster_overrides(args)], args.sets, args.out)
    job = submit_sweep(sweep, dry_run=args.dry_run)
    if job is not None:
        print(plan_table(sweep))
        print(f"submitted array job {job}: {len(sweep.runs)} tasks, mlflow experiment {sweep.experiment!r} "
              f"at {sweep.uri}; logs in {sweep.dir / 'logs'}")
    return 0


def cmd_fit(args) -> int:
    state, sweep_dir = _resolve_for_fit(args)
    fit_opts = dict(state.get("fit") or FIT_DEFAULTS)
    for key in ("metric", "tail", "bootstrap", "params", "level"):
        if getattr(args, key) is not None:
            fit_opts[key] = getattr(args, key)
    fit_opts = check_fit_options(fit_opts, str(args.sweep))
    uri = take_credentials(args.uri) or state["uri"]  # fit.md and the log name the URI
    experiment = args.experiment or state["experiment"]
    experiment_id = state.get("experiment_id") if not (args.uri or args.experiment) else None
    out = Path(args.fit_out) if args.fit_out else sweep_dir / "fit"
    budgets = state.get("budgets") if state.get("budget_kind") == "flops" else []
    summary = fit_sweep(uri, experiment, state["name"], out, fit_opts, flops_mode=state.get("flops", "6ND"),
                        budgets=budgets, experiment_id=experiment_id, include_unfinished=args.include_unfinished,
                        log=lambda m: print(m, file=sys.stderr))
    print((out / "fit.md").read_text())
    print(f"wrote {out}/: fit.md fit.json runs.csv" + (" fit.csv frontier.csv" if summary["fit"] else "")
          + " loss_vs_compute.png compute_optimal.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from star_scale.slurm.submit import add_cluster_flags

    doc = __doc__.split("\n", 2)[2]
    ap = argparse.ArgumentParser(prog="star-scale sweep", description="Scaling-law sweeps: plan a grid of runs, "
                                 "submit them as one Slurm array, fit L(N, D) from mlflow.\n\n" + doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("plan", help="expand a sweep into runs, print the table, write the sweep folder",
                       description="Expand the sweep into runs (N params, D tokens, C FLOPs, steps), print them and "
                       "write the sweep folder: sweep.json, plan.md, tasks/i.args.")
    _add_sweep_args(p)
    p.set_defaults(fn=cmd_plan)

    s = sub.add_parser("submit", help="plan, create the mlflow experiment, sbatch one array (task i = run i)",
                       description="Plan the sweep, check it (configs, cluster layout, data path, partition), create "
                       "its mlflow experiment once and submit one Slurm array: task i trains run i via srun.")
    _add_sweep_args(s)
    add_cluster_flags(s)
    s.set_defaults(fn=cmd_submit)

    f = sub.add_parser("fit", help="read final losses from mlflow, fit L(N,D) and N_opt(C), D_opt(C); write tables + plots",
                       description="Fit L(N, D) = E + A/N^a + B/D^b to the sweep's finished runs (tail-mean loss, "
                       "N from the config, D = tokens_seen), bootstrap confidence intervals, and write fit.md, "
                       "fit.json, fit.csv, runs.csv, frontier.csv, loss_vs_compute.png, compute_optimal.png.")
    f.add_argument("sweep", help="sweep folder (with sweep.json) or sweep file")
    f.add_argument("overrides", nargs="*", help="with a sweep file: the config overrides it was planned with")
    f.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="with a sweep file: sweep keys it was planned with")
    f.add_argument("--out", help="with a sweep file: its sweep folder")
    f.add_argument("--fit-out", help="output folder (default: SWEEP_DIR/fit)")
    f.add_argument("--uri", help="mlflow tracking URI (default: the sweep's)")
    f.add_argument("--experiment", help="mlflow experiment name (default: the sweep's)")
    f.add_argument("--metric", help="loss metric to fit (default: loss; e.g. loss_ar for ST-AR runs)")
    f.add_argument("--tail", type=float, help="average the metric over this last fraction of each run (default 0.1; 0: last point)")
    f.add_argument("--bootstrap", type=int, help="bootstrap refits for the intervals (default 200; 0: none)")
    f.add_argument("--level", type=float, help="confidence level (default 0.95)")
    f.add_argument("--params", choices=["total", "non_embedding"], help="what N counts (default: total)")
    f.add_argument("--include-unfinished", action="store_true", help="also use runs not FINISHED (running, failed)")
    f.set_defaults(fn=cmd_fit)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except ConfigError as e:
        print(f"star-scale sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
