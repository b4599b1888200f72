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
L(N, D) = E + A/N^a + B/D^b plus the compute-optimal N(C), D(C) (star_scale.scaling).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import re
import shlex
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from star_scale import atomic
from star_scale.config import Config, ConfigError, load_config, parse_overrides

TEMPLATE = Path(__file__).resolve().parents[1] / "cluster" / "templates" / "sweep.sbatch"
SPEC_KEYS = ("name", "base", "overrides", "tracking", "out", "flops", "max_parallel", "grid", "compute", "fit")
FIT_DEFAULTS = {"metric": "loss", "tail": 0.1, "bootstrap": 200, "huber_delta": 1e-3, "params": "total",
                "level": 0.95}
# Keys the sweep sets for every run: overrides must not set them.
SWEEP_OWNED = ("name", "train.steps", "train.out_dir", "tracking.uri", "tracking.experiment",
               "tracking.experiment_id", "tracking.enabled", "tracking.run_name")
EXAMPLES = """examples:
  star-scale sweep plan recipes/sweeps/tiny.yaml                 # table + sweeps/tiny/tasks/*.args
  star-scale sweep submit recipes/sweeps/tiny.yaml --dry-run     # print the array script
  star-scale sweep submit recipes/sweeps/tiny.yaml data.path=demo_out/tokens.zarr --set grid.tokens=[1e5,4e5]
  star-scale sweep fit sweeps/tiny                               # sweeps/tiny/fit/: fit.md, runs.csv, *.png
"""
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SweepError(ConfigError):
    pass


# ---- helpers -------------------------------------------------------------------
def short(x: float) -> str:
    """Compact number for names and tables: 2048 -> 2048, 20480 -> 2.05e4, 1e9 -> 1e9."""
    if x < 1e4 and float(x).is_integer():
        return str(int(x))
    mant, exp = f"{x:.3g}".split("e") if "e" in f"{x:.3g}" else (f"{x:.3g}", "0")
    return f"{mant}e{int(exp)}" if int(exp) else mant


def _number(value, key: str, where: str, integer: bool = False) -> float:
    """YAML reads 1e9 as a string: accept numbers and numeric strings, positive only."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SweepError(f"{where}: {key}={value!r}: expected a positive number") from None
    if not x > 0 or not math.isfinite(x) or (integer and not x.is_integer()):
        raise SweepError(f"{where}: {key}={value!r}: expected a positive {'integer' if integer else 'number'}")
    return int(x) if integer else x


def _override_value(value: Any) -> str:
    """A value as override text (parsed back as YAML by load_config); always one line."""
    if isinstance(value, str) and "\n" not in value:
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _flatten(tree: Any, where: str, prefix: str = "") -> list[str]:
    """A mapping (nested and/or dotted keys) or a list of key=value strings -> ['a.b=v', ...]."""
    if tree is None:
        return []
    if isinstance(tree, list):
        for item in tree:
            if not isinstance(item, str) or "=" not in item:
                raise SweepError(f"{where}: {item!r}: expected key.sub=value")
        return list(tree)
    if not isinstance(tree, dict):
        raise SweepError(f"{where}: expected a mapping of config keys (or a list of key=value), got {tree!r}")
    out = []
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, where, f"{full}.")
        else:
            out.append(f"{full}={_override_value(value)}")
    return out


def _atomic_write(path: Path, data: str | bytes) -> None:
    atomic.write_bytes(path, data.encode() if isinstance(data, str) else data)


def _keys(overrides: list[str]) -> list[str]:
    return [key for key, _ in parse_overrides(overrides)]


def views(cfg: Config) -> int:
    from star_scale.training_module import ARModule, STARModule

    return {"ar": ARModule.views, "star": STARModule.views}[cfg.objective.name]


def model_params(cfg: Config, kind: str = "total") -> int:
    """N: all parameters (`total`) or the transformer blocks' only (`non_embedding`)."""
    from star_scale.models.build import gpt_args
    from star_scale.plan import count_params

    total, block = count_params(cfg)
    return total if kind == "total" else gpt_args(cfg).layers * block


def train_flops_per_token(cfg: Config) -> float:
    """The model's training FLOPs per token (ST-AR: x its teacher's extra forward), from shapes only."""
    import torch

    from star_scale.models.build import build_model
    from star_scale.training_module import build_training_module

    with torch.device("meta"):
        model = build_model(cfg)
        module = build_training_module(cfg, model)
    return float(model.flops_per_token(training=True) * getattr(module, "flops_factor", 1.0))


def flops(cfg: Config, n_params: int, tokens: float, mode: str) -> float:
    return 6.0 * n_params * tokens if mode == "6ND" else train_flops_per_token(cfg) * tokens


# ---- the sweep -------------------------------------------------------------------
@dataclass
class SweepRun:
    index: int
    label: str  # size + budget, e.g. "s-D2e4": the run's folder and mlflow tag sweep_run
    name: str  # config name: "<sweep>-<label>"
    size: str
    budget: float  # what was asked: D tokens, steps, or C FLOPs
    n_params: int
    tokens: int  # D actually trained: steps x tokens per step
    flops: float  # C for those tokens
    steps: int
    tokens_per_step: int
    args: list[str]  # `star-scale train` arguments: base recipe, then overrides


@dataclass
class Sweep:
    name: str
    file: Path
    base: Path
    dir: Path
    uri: str
    experiment: str
    mode: str  # grid | compute
    budget_kind: str  # tokens | steps | flops
    flops: str  # 6ND | model
    max_parallel: Optional[int]
    fit: dict
    common: list[str]
    runs: list[SweepRun] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)

    def configs(self) -> list[Config]:
        return [load_config(r.args[0], r.args[1:]) for r in self.runs]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("file", "base", "dir"):
            d[k] = str(d[k])
        return d


def _set_spec(spec: dict, sets: list[str], where: str) -> dict:
    for key, value in parse_overrides(sets):
        node = spec
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return spec


def _sizes(value, where: str) -> dict[str, list[str]]:
    if not isinstance(value, dict) or not value:
        raise SweepError(f"{where}: expected a mapping of size name -> config overrides "
                         f"(e.g. {{s: {{model.width: 32, model.layers: 1, model.heads: 2}}}}), got {value!r}")
    out = {}
    for label, overrides in value.items():
        label = str(label)
        if overrides is None:  # `--set grid.sizes.w64=null` drops a size
            continue
        if not LABEL_RE.match(label):
            raise SweepError(f"{where}.{label}: size names may use letters, digits, '_', '.', '-' only")
        if isinstance(overrides, str):  # shorthand: a preset name
            overrides = {"model.preset": overrides}
        out[label] = _flatten(overrides, f"{where}.{label}")
    if not out:
        raise SweepError(f"{where}: every size is null: nothing to run")
    return out


def load_sweep(path: str | os.PathLike, overrides: list[str] = (), sets: list[str] = (),
               out: Optional[str] = None) -> Sweep:
    """Read and expand a sweep file: every run's config loads and validates, or SweepError names the key."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise SweepError(f"sweep {where!r}: file not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"sweep {where!r}: invalid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"sweep {where!r}: expected a mapping at the top level")
    try:
        spec = _set_spec(spec, list(sets), where)
    except ConfigError as e:
        raise SweepError(f"sweep {where!r}: --set: {e}") from None
    for key in spec:
        if key not in SPEC_KEYS:
            raise SweepError(f"{where}: unknown key {key!r}; expected one of {list(SPEC_KEYS)}")

    name = str(spec.get("name") or path.stem)
    if not LABEL_RE.match(name):
        raise SweepError(f"{where}: name={name!r}: use letters, digits, '_', '.', '-' only")
    if not spec.get("base"):
        raise SweepError(f"{where}: base: missing; expected the recipe every run starts from, e.g. base: ../tiny-ar.yaml")
    base = (path.parent / str(spec["base"])).resolve()
    if not base.is_file():
        raise SweepError(f"{where}: base={spec['base']!r}: recipe {str(base)!r} not found (paths are relative to the sweep file)")

    flops_mode = str(spec.get("flops", "6ND"))
    if flops_mode not in ("6ND", "model"):
        raise SweepError(f"{where}: flops={flops_mode!r}: expected 6ND or model")
    max_parallel = spec.get("max_parallel")
    if max_parallel is not None:
        max_parallel = int(_number(max_parallel, "max_parallel", where, integer=True))

    fit = dict(FIT_DEFAULTS)
    user_fit = spec.get("fit") or {}
    if not isinstance(user_fit, dict):
        raise SweepError(f"{where}: fit: expected a mapping with keys {sorted(FIT_DEFAULTS)}")
    for key, value in user_fit.items():
        if key not in FIT_DEFAULTS:
            raise SweepError(f"{where}: fit.{key}: unknown key; expected one of {sorted(FIT_DEFAULTS)}")
        fit[key] = value
    fit = check_fit_options(fit, where)

    tracking = spec.get("tracking") or {}
    if not isinstance(tracking, dict) or set(tracking) - {"uri", "experiment"}:
        raise SweepError(f"{where}: tracking: expected a mapping with keys uri, experiment; got {tracking!r}")

    sweep_dir = Path((out or spec.get("out") or "sweeps/{name}").format(name=name)).resolve()

    common = [*_flatten(spec.get("overrides"), f"{where}: overrides"), *overrides]
    for key in _keys(common):
        if key in SWEEP_OWNED:
            hint = "the sweep's tracking: section" if key.startswith("tracking.") else "the sweep"
            raise SweepError(f"{where}: override {key}: set by {hint} for every run; remove it")

    if ("grid" in spec) == ("compute" in spec):
        raise SweepError(f"{where}: expected exactly one of grid: (sizes x tokens or steps) or compute: (budgets x sizes)")
    mode = "grid" if "grid" in spec else "compute"
    section = spec[mode]
    if not isinstance(section, dict):
        raise SweepError(f"{where}: {mode}: expected a mapping")
    allowed = {"grid": {"sizes", "tokens", "steps"}, "compute": {"sizes", "budgets"}}[mode]
    for key in section:
        if key not in allowed:
            raise SweepError(f"{where}: {mode}.{key}: unknown key; expected one of {sorted(allowed)}")
    sizes = _sizes(section.get("sizes"), f"{where}: {mode}.sizes")
    if mode == "grid":
        if ("tokens" in section) == ("steps" in section):
            raise SweepError(f"{where}: grid: expected exactly one of tokens: [D, ...] or steps: [...]")
        budget_kind = "tokens" if "tokens" in section else "steps"
    else:
        budget_kind = "flops"
    key = {"tokens": "grid.tokens", "steps": "grid.steps", "flops": "compute.budgets"}[budget_kind]
    raw = section.get(key.split(".")[1])
    if not isinstance(raw, list) or not raw:
        raise SweepError(f"{where}: {key}: expected a non-empty list, got {raw!r}")
    budgets = [_number(v, f"{key}[{i}]", where, integer=budget_kind == "steps") for i, v in enumerate(raw)]
    if len(set(budgets)) != len(budgets):
        raise SweepError(f"{where}: {key}={raw}: budgets repeat")

    # The tracking store every run shares.
    probe_label = next(iter(sizes))
    try:
        probe = load_config(base, [*common, *sizes[probe_label]])
    except ConfigError as e:
        raise SweepError(f"{where}: size {probe_label}: {e}") from None
    uri = tracking.get("uri") or probe.tracking.uri or f"sqlite:///{sweep_dir / 'mlflow.db'}"
    experiment = str(tracking.get("experiment") or name)

    sweep = Sweep(name=name, file=path.resolve(), base=base, dir=sweep_dir, uri=uri, experiment=experiment,
                  mode=mode, budget_kind=budget_kind, flops=flops_mode, max_parallel=max_parallel, fit=fit,
                  common=common, budgets=budgets, sizes=list(sizes))
    fpt_cache: dict = {}
    for label, size_overrides in sizes.items():
        run_overrides = [*common, *size_overrides]
        try:
            cfg = load_config(base, run_overrides)
        except ConfigError as e:
            raise SweepError(f"{where}: size {label}: {e}") from None
        n = model_params(cfg, fit["params"])
        tps = cfg.data.global_batch * views(cfg) * cfg.model.grid_size**2
        per_token = 6.0 * n if flops_mode == "6ND" else fpt_cache.setdefault(label, train_flops_per_token(cfg))
        for budget in budgets:
            if budget_kind == "steps":
                steps = int(budget)
            else:
                d_target = budget if budget_kind == "tokens" else budget / per_token
                steps = round(d_target / tps)
                if steps < 1:
                    what = f"D={short(budget)} tokens" if budget_kind == "tokens" else \
                        f"C={short(budget)} FLOPs (D = {short(d_target)} tokens for N={short(n)})"
                    raise SweepError(f"{where}: {key}: {what} with size {label} is less than one step of "
                                     f"{tps} tokens (data.global_batch={cfg.data.global_batch}); raise the budget")
            tag = {"tokens": "D", "steps": "s", "flops": "C"}[budget_kind]
            run_label = f"{label}-{tag}{short(budget)}"
            tokens = steps * tps
            args = [str(base), *run_overrides, f"train.steps={steps}", f"name={name}-{run_label}",
                    f"train.out_dir={sweep_dir / 'runs' / run_label}", "tracking.enabled=true",
                    f"tracking.uri={_override_value(uri)}", f"tracking.experiment={_override_value(experiment)}"]
            try:
                load_config(args[0], args[1:])
            except ConfigError as e:
                raise SweepError(f"{where}: run {run_label}: {e}") from None
            sweep.runs.append(SweepRun(index=len(sweep.runs), label=run_label, name=f"{name}-{run_label}",
                                       size=label, budget=budget, n_params=n, tokens=tokens,
                                       flops=per_token * tokens, steps=steps, tokens_per_step=tps, args=args))
    return sweep


def check_fit_options(fit: dict, where: str) -> dict:
    fit = dict(fit)
    if fit["params"] not in ("total", "non_embedding"):
        raise SweepError(f"{where}: fit.params={fit['params']!r}: expected total or non_embedding")
    try:
        fit["tail"] = float(fit["tail"])
        fit["bootstrap"] = int(fit["bootstrap"])
        fit["huber_delta"] = float(fit["huber_delta"])
        fit["level"] = float(fit["level"])
    except (TypeError, ValueError) as e:
        raise SweepError(f"{where}: fit: {e}") from None
    if not 0 <= fit["tail"] < 1:
        raise SweepError(f"{where}: fit.tail={fit['tail']}: expected a fraction of the run in [0, 1)")
    if fit["bootstrap"] < 0 or not 0 < fit["level"] < 1 or fit["huber_delta"] <= 0:
        raise SweepError(f"{where}: fit: expected bootstrap >= 0, 0 < level < 1, huber_delta > 0; got {fit}")
    return fit


# ---- plan --------------------------------------------------------------------------
def plan_table(sweep: Sweep) -> str:
    what = {"tokens": "token budgets", "steps": "step counts", "flops": "compute budgets"}[sweep.budget_kind]
    c_def = "6ND" if sweep.flops == "6ND" else "model FLOPs/token x D"
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} runs = {len(sweep.sizes)} sizes x {len(sweep.budgets)} {what}; "
             f"base {sweep.base}; C = {c_def}; N = {sweep.fit['params']} parameters",
             f"mlflow experiment {sweep.experiment!r} at {sweep.uri}; folder {sweep.dir}",
             f"{'#':>3}  {'run':<22}{'size':<10}{'N params':>10}{'D tokens':>11}{'C FLOPs':>11}{'steps':>8}{'tok/step':>10}"]
    for r in sweep.runs:
        lines.append(f"{r.index:>3}  {r.label:<22}{r.size:<10}{short(r.n_params):>10}{short(r.tokens):>11}"
                     f"{short(r.flops):>11}{r.steps:>8}{r.tokens_per_step:>10}")
    return "\n".join(lines)


def write_plan(sweep: Sweep) -> None:
    """The sweep folder: sweep.json, plan.md, tasks/i.args (+ tags) for the array tasks, logs/."""
    d = sweep.dir
    tasks = d / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (d / "logs").mkdir(exist_ok=True)
    for r in sweep.runs:
        _atomic_write(tasks / f"{r.index}.args", "".join(a + "\n" for a in r.args))
        tags = {"sweep": sweep.name, "sweep_run": r.label, "sweep_size": r.size, "sweep_index": r.index}
        _atomic_write(tasks / f"{r.index}.tags.json", json.dumps(tags))
    for stale in tasks.iterdir():  # a re-plan with fewer runs
        index = stale.name.split(".")[0]
        if index.isdigit() and int(index) >= len(sweep.runs):
            stale.unlink()
    state = read_state(d)
    state.update(sweep.to_dict())
    _atomic_write(d / "sweep.json", json.dumps(state, indent=1))
    _atomic_write(d / "plan.md", "```\n" + plan_table(sweep) + "\n```\n")


def read_state(sweep_dir: Path) -> dict:
    path = sweep_dir / "sweep.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- submit ------------------------------------------------------------------------
def check_submission(sweep: Sweep, query_slurm: bool = True) -> list[Config]:
    """Everything sbatch would not catch: cluster layout, one resource shape for the array, data present."""
    from star_scale.submit import check_cluster

    cfgs = sweep.configs()
    first = cfgs[0].cluster
    for run, cfg in zip(sweep.runs, cfgs):
        for f in dataclasses.fields(first):
            if getattr(cfg.cluster, f.name) != getattr(first, f.name):
                raise SweepError(f"{sweep.file}: cluster.{f.name} differs between runs {sweep.runs[0].label} "
                                 f"({getattr(first, f.name)!r}) and {run.label} ({getattr(cfg.cluster, f.name)!r}): "
                                 f"one Slurm array has one resource shape")
        try:
            check_cluster(cfg, query_slurm=query_slurm and run.index == 0)
        except ConfigError as e:
            raise SweepError(f"{sweep.file}: run {run.label}: {e}") from None
        if not Path(cfg.data.path).exists():
            raise SweepError(f"{sweep.file}: run {run.label}: data.path={cfg.data.path!r}: not found "
                             f"(relative to {Path.cwd()}, where the tasks run)")
    return cfgs


def ensure_experiment(uri: str, name: str, sweep_dir: Path) -> str:
    """Create (or find) the sweep's experiment once, before any task starts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise SweepError(f"mlflow experiment {name!r} at {uri} is deleted: restore it or set the sweep's "
                             "tracking.experiment to another name")
        return exp.experiment_id
    local = not uri.startswith(("http://", "https://", "databricks"))
    artifacts = (sweep_dir / "artifacts").resolve().as_uri() if local else None
    return client.create_experiment(name, artifact_location=artifacts)


def render(sweep: Sweep, cfg: Config, experiment_id: str) -> str:
    """The array script: resources from the runs' (shared) cluster section, task i = run i."""
    from star_scale.submit import fill, sbatch_options

    c = cfg.cluster
    array = f"0-{len(sweep.runs) - 1}" + (f"%{sweep.max_parallel}" if sweep.max_parallel else "")
    return fill(TEMPLATE, {
        "JOB_NAME": f"sweep-{sweep.name}", "ARRAY": array, "NODES": c.nodes, "TASKS_PER_NODE": c.ranks_per_node(),
        "CPUS_PER_TASK": c.cpus_per_task, "TIME": c.time, "SIGNAL_SECONDS": c.signal_seconds,
        "EXTRA_SBATCH": "\n".join(sbatch_options(c)), "EXPERIMENT_ID": shlex.quote(experiment_id),
        "WORKDIR": shlex.quote(str(Path.cwd())), "PYTHON": shlex.quote(sys.executable),
        "SWEEP_DIR": sweep.dir, "SWEEP_DIR_Q": shlex.quote(str(sweep.dir)), "SWEEP_NAME": sweep.name,
    })


def submit_sweep(sweep: Sweep, dry_run: bool = False) -> Optional[str]:
    from star_scale.submit import sbatch

    cfgs = check_submission(sweep, query_slurm=not dry_run)
    if dry_run:
        print(render(sweep, cfgs[0], "<created at submission>"))
        return None
    write_plan(sweep)
    experiment_id = ensure_experiment(sweep.uri, sweep.experiment, sweep.dir)
    script = render(sweep, cfgs[0], experiment_id)
    path = sweep.dir / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    _atomic_write(path, script)
    job = sbatch(path)
    state = read_state(sweep.dir)
    state["experiment_id"] = experiment_id
    state.setdefault("jobs", []).append({"job": job, "script": str(path), "time": time.time()})
    _atomic_write(sweep.dir / "sweep.json", json.dumps(state, indent=1))
    _atomic_write(sweep.dir / "slurm_job_id", job + "\n")
    return job


# ---- fit: read runs back from mlflow -----------------------------------------------------
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


# ---- fit: the law, its frontier, tables and plots -------------------------------------------------
def frontier_points(results: list[RunResult]) -> list[RunResult]:
    """Runs no cheaper run beats: the empirical loss-vs-compute frontier."""
    best, out = math.inf, []
    for r in sorted(results, key=lambda r: r.flops):
        if r.loss < best:
            best = r.loss
            out.append(r)
    return out


def analyse(results: list[RunResult], fit_opts: dict, budgets: list[float] = (), log=print) -> dict:
    import numpy as np

    from star_scale import scaling

    N = np.array([r.n_params for r in results], dtype=float)
    D = np.array([r.tokens for r in results], dtype=float)
    L = np.array([r.loss for r in results], dtype=float)
    C = np.array([r.flops for r in results], dtype=float)
    out: dict = {"runs": len(results), "warnings": []}
    if len(results):
        k = float(np.median(C / (N * D)))
        out["k"] = k  # C = k N D: 6 for 6ND, the sweep's median model FLOPs per parameter-token otherwise
    if len(set(N)) < 2 or len(set(D)) < 2 or len(results) < 3:
        out["warnings"].append(f"no fit: need >= 3 runs over >= 2 model sizes and >= 2 token counts "
                               f"(have {len(results)} runs, {len(set(N))} sizes, {len(set(D))} token counts)")
        return out
    if len(results) < 6:
        out["warnings"].append(f"{len(results)} runs for 5 parameters: the fit is (nearly) underdetermined; "
                               "treat exponents and intervals as illustrative")
    delta, level = fit_opts["huber_delta"], fit_opts["level"]
    fit = scaling.fit_law(N, D, L, delta=delta)
    boots = scaling.bootstrap(N, D, L, fit, samples=fit_opts["bootstrap"], delta=delta) if fit_opts["bootstrap"] else []
    out["fit"] = fit
    out["bootstrap"] = boots
    rows = []
    for key in ("E", "A", "a", "B", "b", "n_exponent", "d_exponent", "G"):
        value = getattr(fit, key)
        lo, hi = scaling.interval([getattr(f, key) for f in boots], level)
        rows.append({"parameter": key, "estimate": value, "ci_low": lo, "ci_high": hi})
    out["parameters"] = rows
    if budgets:
        grid = sorted(budgets)
    else:
        grid = list(np.geomspace(C.min(), C.max(), 5)) if C.min() < C.max() else [float(C.min())]
    frontier = []
    for c in grid:
        n_lo, n_hi = scaling.interval([float(f.n_opt(c, out["k"])) for f in boots], level)
        d_lo, d_hi = scaling.interval([float(f.d_opt(c, out["k"])) for f in boots], level)
        frontier.append({"C": float(c), "N_opt": float(fit.n_opt(c, out["k"])), "N_low": n_lo, "N_high": n_hi,
                         "D_opt": float(fit.d_opt(c, out["k"])), "D_low": d_lo, "D_high": d_hi,
                         "L_opt": float(fit.loss_opt(c, out["k"]))})
    out["frontier"] = frontier
    out["isoflop"] = scaling.isoflop_minima(C, N, L)
    if len(out["isoflop"]) >= 2:
        cs, ns, _ = zip(*out["isoflop"])
        out["isoflop_n_exponent"] = scaling.power_law(cs, ns)[0]
    return out


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.4g}"


def _ci(lo, hi) -> str:
    return f"[{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) else "-"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def run_rows(results: list[RunResult], fit) -> list[dict]:
    return [{"run": r.label, "size": r.size, "N": r.n_params, "D": int(r.tokens), "C": r.flops, "steps": r.steps[-1],
             "loss": r.loss, "predicted": float(fit.predict(r.n_params, r.tokens)) if fit else float("nan"),
             "status": r.status, "run_id": r.run_id} for r in results]


def markdown(title: str, header: list[str], analysis: dict, results: list[RunResult], fit_opts: dict) -> str:
    fit = analysis.get("fit")
    level = int(round(100 * fit_opts["level"]))
    lines = [f"# {title}", "", *header, ""]
    lines += [f"> {w}" for w in analysis["warnings"]] + ([""] if analysis["warnings"] else [])
    if fit:
        lines += [f"## L(N, D) = E + A / N^a + B / D^b", "",
                  f"| parameter | estimate | {level}% CI ({len(analysis['bootstrap'])} bootstrap refits) |",
                  "|---|---|---|"]
        names = {"n_exponent": "N_opt exponent b/(a+b)", "d_exponent": "D_opt exponent a/(a+b)",
                 "G": "G = (aA/bB)^(1/(a+b))"}
        for row in analysis["parameters"]:
            lines.append(f"| {names.get(row['parameter'], row['parameter'])} | {_fmt(row['estimate'])} | "
                         f"{_ci(row['ci_low'], row['ci_high'])} |")
        k = analysis["k"]
        lines += ["", f"## Compute-optimal allocation, C = {k:.3g} N D", "",
                  f"N_opt(C) = G (C/{k:.3g})^{_fmt(fit.n_exponent)}, D_opt(C) = (C/{k:.3g}) / N_opt(C)", "",
                  f"| C FLOPs | N_opt | {level}% CI | D_opt | {level}% CI | D/N | L_opt |", "|---|---|---|---|---|---|---|"]
        for f in analysis["frontier"]:
            lines.append(f"| {_fmt(f['C'])} | {_fmt(f['N_opt'])} | {_ci(f['N_low'], f['N_high'])} | {_fmt(f['D_opt'])} | "
                         f"{_ci(f['D_low'], f['D_high'])} | {_fmt(f['D_opt'] / f['N_opt'])} | {_fmt(f['L_opt'])} |")
        if analysis.get("isoflop"):
            lines += ["", "IsoFLOP minima (parabola in log N per budget, Chinchilla approach 2): " + ", ".join(
                f"C={_fmt(c)}: N={_fmt(n)} (L={_fmt(l_)})" for c, n, l_ in analysis["isoflop"])]
            if "isoflop_n_exponent" in analysis:
                lines.append(f"their N_opt exponent: {_fmt(analysis['isoflop_n_exponent'])}")
    lines += ["", f"## Runs ({len(results)})", "",
              "| run | size | N | D | C | steps | loss | fit | status |", "|---|---|---|---|---|---|---|---|---|"]
    for row in run_rows(results, fit):
        lines.append(f"| {row['run']} | {row['size']} | {short(row['N'])} | {short(row['D'])} | {short(row['C'])} | "
                     f"{row['steps']} | {row['loss']:.4f} | {_fmt(row['predicted'])} | {row['status']} |")
    return "\n".join(lines) + "\n"


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _atomic_write(path, buf.getvalue())


def plot(results: list[RunResult], analysis: dict, out: Path, title: str, level: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fit, k = analysis.get("fit"), analysis.get("k", 6.0)
    written = []
    sizes = sorted({r.size for r in results}, key=lambda s: min(r.n_params for r in results if r.size == s))
    colors = {s: plt.cm.viridis(i / max(1, len(sizes) - 1)) for i, s in enumerate(sizes)}

    # 1. loss vs compute per size: the runs' curves, their (tail-smoothed) final points, the fit, the frontier.
    fig, ax = plt.subplots(figsize=(7, 5))
    c_lo = min(r.steps[0] * r.step_tokens * r.flops_per_token for r in results)
    c_hi = 2 * max(r.flops for r in results)
    for s in sizes:
        runs = [r for r in results if r.size == s]
        n = runs[0].n_params
        for r in runs:
            c = np.array(r.steps, dtype=float) * r.step_tokens * r.flops_per_token
            ax.plot(c, r.losses, color=colors[s], alpha=0.35, lw=1)
        ax.scatter([r.flops for r in runs], [r.loss for r in runs], color=colors[s], zorder=3,
                   label=f"{s} (N={short(n)})")
        if fit:
            c = np.geomspace(min(r.steps[0] * r.step_tokens * r.flops_per_token for r in runs),
                             2 * max(r.flops for r in runs), 100)
            ax.plot(c, fit.predict(n, c / (k * n)), color=colors[s], ls="--", lw=1)
    if fit:
        c = np.geomspace(c_lo, c_hi, 200)
        ax.plot(c, fit.loss_opt(c, k), color="black", lw=2,
                label=f"compute-optimal L(N_opt, D_opt); fit a={fit.a:.3g}, b={fit.b:.3g}")
    losses = [v for r in results for v in r.losses if np.isfinite(v) and v > 0]
    ax.set_ylim(min(losses) / 1.1, max(losses) * 1.1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"compute C (FLOPs, C = {k:.3g} N D)")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss vs compute per model size")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    _save_png(fig, out / "loss_vs_compute.png")
    plt.close(fig)
    written.append(out / "loss_vs_compute.png")

    # 2. compute-optimal N(C) and D(C) with bootstrap bands; the empirical frontier's runs as points.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    front = frontier_points(results)
    c_all = np.array([r.flops for r in results])
    c = np.geomspace(c_all.min() / 3, c_all.max() * 10, 100)
    boots = analysis.get("bootstrap") or []
    for ax, what in zip(axes, ("N", "D")):
        if fit:
            fn = (lambda f, x: f.n_opt(x, k)) if what == "N" else (lambda f, x: f.d_opt(x, k))
            exp = fit.n_exponent if what == "N" else fit.d_exponent
            key = "n_exponent" if what == "N" else "d_exponent"
            row = next(r for r in analysis["parameters"] if r["parameter"] == key)
            ax.plot(c, fn(fit, c), color="C0", lw=2,
                    label=f"{what}_opt ∝ C^{exp:.3f}  {int(round(100 * level))}% CI {_ci(row['ci_low'], row['ci_high'])}")
            if len(boots) >= 10:
                curves = np.array([fn(f, c) for f in boots])
                lo, hi = np.nanpercentile(curves, [50 * (1 - level), 50 * (1 + level)], axis=0)
                ax.fill_between(c, lo, hi, color="C0", alpha=0.2, lw=0)
        ax.scatter([r.flops for r in front], [r.n_params if what == "N" else r.tokens for r in front],
                   color="C1", zorder=3, label="frontier runs (lowest loss so far)")
        if what == "N" and analysis.get("isoflop"):
            ic, inn, _ = zip(*analysis["isoflop"])
            ax.scatter(ic, inn, marker="x", color="C3", zorder=4, label="isoFLOP minima")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(f"{what}_opt ({'parameters' if what == 'N' else 'tokens'})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: compute-optimal model size and data")
    _save_png(fig, out / "compute_optimal.png")
    plt.close(fig)
    written.append(out / "compute_optimal.png")
    return written


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


# ---- CLI ------------------------------------------------------------------------------
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
    from star_scale.submit import cluster_overrides

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
    uri = args.uri or state["uri"]
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
    from star_scale.submit import add_cluster_flags

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
