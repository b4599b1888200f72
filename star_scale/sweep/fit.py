"""`sweep fit`: read the runs from mlflow, fit, and write the tables and plots into the fit folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from star_scale.sweep.analysis import analyse
from star_scale.sweep.common import SweepError, _atomic_write
from star_scale.sweep.report import _csv, markdown, plot, run_rows
from star_scale.sweep.results import collect


def fit_sweep(uri: str, experiment: str, sweep_name: str, out: Path, fit_opts: dict, flops_mode: str = "6ND",
              budgets: list[float] = (), experiment_id: Optional[str] = None, include_unfinished: bool = False,
              log=print) -> dict:
    """Read the sweep's runs from mlflow, fit, and write fit.md, fit.json, fit.csv, runs.csv, frontier.csv and
    the PNGs into `out` (each file replaced atomically)."""
    results = collect(uri, experiment, sweep_name, metric=fit_opts["metric"], tail=fit_opts["tail"],
                      params_kind=fit_opts["params"], flops_mode=flops_mode, experiment_id=experiment_id,
                      include_unfinished=include_unfinished, log=log)
    if not results:
        raise SweepError(f"no finished runs tagged sweep={sweep_name!r} in experiment {experiment!r} at {uri}")
    analysis = analyse(results, fit_opts, budgets, log=log)
    fit = analysis.get("fit")
    out.mkdir(parents=True, exist_ok=True)
    header = [f"- sweep `{sweep_name}`, mlflow experiment `{experiment}` at `{uri}`",
              f"- loss: mean of `{fit_opts['metric']}` over the last {fit_opts['tail']:.0%} of each run; "
              f"N: {fit_opts['params']} parameters; D: tokens_seen; C = {analysis.get('k', 6):.3g} N D",
              f"- fit: Huber (delta {fit_opts['huber_delta']:g}) on log L, L-BFGS from an NNLS grid over (a, b)"]
    _atomic_write(out / "fit.md", markdown(f"Scaling fit: {sweep_name}", header, analysis, results, fit_opts))
    _atomic_write(out / "runs.csv", _csv(run_rows(results, fit)))
    if fit:
        _atomic_write(out / "fit.csv", _csv(analysis["parameters"]))
        _atomic_write(out / "frontier.csv", _csv(analysis["frontier"]))
    summary = {"sweep": sweep_name, "experiment": experiment, "uri": uri, "options": fit_opts,
               "warnings": analysis["warnings"], "k": analysis.get("k"),
               "fit": fit.to_dict() if fit else None, "parameters": analysis.get("parameters"),
               "frontier": analysis.get("frontier"), "isoflop": analysis.get("isoflop"),
               "runs": run_rows(results, fit)}
    _atomic_write(out / "fit.json", json.dumps(summary, indent=1))
    plot(results, analysis, out, sweep_name, fit_opts["level"])
    return summary
