"""`sweep fit`, step 1: read the sweep's runs back from mlflow (N, D, C and the tail-mean loss per run)."""
from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Optional

from star_scale.config import Config, ConfigError, load_config
from star_scale.sweep.common import SweepError
from star_scale.sweep.costs import model_params, train_flops_per_token


@dataclass
class RunResult:
    label: str
    size: str
    run_id: str
    status: str
    n_params: int
    tokens: float  # D: tokens_seen at the end
    flops: float  # C
    loss: float  # tail mean of the metric
    steps: list  # metric history
    losses: list
    step_tokens: float  # tokens per step (tokens_seen / step)
    flops_per_token: float  # C / D


def config_from_params(params: dict) -> Config:
    """A run's model and objective config back from its mlflow params (all strings; None as 'None')."""
    from star_scale.config import ModelConfig, ObjectiveConfig

    overrides = []
    for section, cls in (("model", ModelConfig), ("objective", ObjectiveConfig)):
        hints = typing.get_type_hints(cls)
        for key, tp in hints.items():
            raw = params.get(f"{section}.{key}")
            if raw is None:
                continue
            if raw == "None":
                value = "null"
            elif tp is str or tp == Optional[str]:
                value = json.dumps(raw)
            else:
                value = raw
            overrides.append(f"{section}.{key}={value}")
    return load_config(None, overrides)


def _search(client, experiment_id: str, sweep_name: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.sweep = '{sweep_name}'",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def tail_mean(steps, values, tail: float) -> float:
    """Mean of the points in the last `tail` fraction of the run (at least the last point)."""
    last = steps[-1]
    picked = [v for s, v in zip(steps, values) if s > (1 - tail) * last] or [values[-1]]
    return float(sum(picked) / len(picked))


def collect(uri: str, experiment: str, sweep_name: str, metric: str = "loss", tail: float = 0.1,
            params_kind: str = "total", flops_mode: str = "6ND", experiment_id: Optional[str] = None,
            include_unfinished: bool = False, log=print) -> list[RunResult]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if not experiment_id:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SweepError(f"mlflow experiment {experiment!r} not found at {uri}: was the sweep submitted?")
        experiment_id = exp.experiment_id
    found = _search(client, experiment_id, sweep_name)
    latest: dict = {}
    for run in sorted(found, key=lambda r: r.info.start_time or 0):
        label = run.data.tags.get("sweep_run") or run.info.run_name
        if run.info.status != "FINISHED" and not include_unfinished:
            log(f"skipping run {label} ({run.info.run_id}): status {run.info.status}")
            continue
        latest[label] = run  # a resubmission's newer run replaces an older one of the same label
    results = []
    for label, run in sorted(latest.items()):
        try:
            cfg = config_from_params(run.data.params)
        except ConfigError as e:
            log(f"skipping run {label} ({run.info.run_id}): its params do not form a config: {e}")
            continue
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        tokens_hist = sorted(client.get_metric_history(run.info.run_id, "tokens_seen"), key=lambda m: m.step)
        if not history or not tokens_hist:
            log(f"skipping run {label} ({run.info.run_id}): no {metric!r} or 'tokens_seen' metric logged")
            continue
        steps = [m.step for m in history]
        values = [m.value for m in history]
        # one point per step (a resumed run may log a step twice): keep the last
        by_step = dict(zip(steps, values))
        steps, values = sorted(by_step), [by_step[s] for s in sorted(by_step)]
        n = model_params(cfg, params_kind)
        tokens = float(tokens_hist[-1].value)
        per_token = 6.0 * n if flops_mode == "6ND" else train_flops_per_token(cfg)
        results.append(RunResult(label=label, size=run.data.tags.get("sweep_size", str(n)), run_id=run.info.run_id,
                                 status=run.info.status, n_params=n, tokens=tokens, flops=per_token * tokens,
                                 loss=tail_mean(steps, values, tail), steps=steps, losses=values,
                                 step_tokens=tokens / max(tokens_hist[-1].step, 1), flops_per_token=per_token))
    return results
