"""`star-scale sweep plan|submit|fit`: scaling-law sweeps on Slurm, tracked in one mlflow experiment.

The sweep file's format and the commands: `star-scale sweep --help` (cli.py). One job per module:

    spec.py      the sweep file: load_sweep expands it into runs; plan_table, write_plan (the sweep folder)
    submit.py    checks, the mlflow experiment (created once), the rendered array script, sbatch
    results.py   fit, step 1: the runs read back from mlflow
    analysis.py  fit, step 2: L(N, D) and the compute-optimal frontier (star_scale.sweep.scaling)
    report.py    fit, step 3: tables and plots
    fit.py       fit_sweep: the three steps, written into the fit folder
    cli.py       argparse: main(argv)
    costs.py     N and training FLOPs from a config;  common.py: SweepError, short, atomic writes
"""
from star_scale.sweep.analysis import analyse, frontier_points
from star_scale.sweep.cli import EXAMPLES, build_parser, cmd_fit, cmd_plan, cmd_submit, main
from star_scale.sweep.common import SweepError, short
from star_scale.sweep.costs import flops, model_params, train_flops_per_token, views
from star_scale.sweep.fit import fit_sweep
from star_scale.sweep.report import markdown, plot, run_rows
from star_scale.sweep.results import RunResult, collect, config_from_params, tail_mean
from star_scale.sweep.spec import (
                                   FIT_DEFAULTS,
                                   LABEL_RE,
                                   SPEC_KEYS,
                                   SWEEP_OWNED,
                                   Sweep,
                                   SweepRun,
                                   check_fit_options,
                                   load_sweep,
                                   plan_table,
                                   read_state,
                                   write_plan,
)
from star_scale.sweep.submit import TEMPLATE, check_submission, ensure_experiment, render, submit_sweep

__all__ = [
    "EXAMPLES", "FIT_DEFAULTS", "LABEL_RE", "SPEC_KEYS", "SWEEP_OWNED", "TEMPLATE",
    "RunResult", "Sweep", "SweepError", "SweepRun",
    "analyse", "build_parser", "check_fit_options", "check_submission", "cmd_fit", "cmd_plan", "cmd_submit",
    "collect", "config_from_params", "ensure_experiment", "fit_sweep", "flops", "frontier_points", "load_sweep",
    "main", "markdown", "model_params", "plan_table", "plot", "read_state", "render", "run_rows", "short",
    "submit_sweep", "tail_mean", "train_flops_per_token", "views", "write_plan",
]
