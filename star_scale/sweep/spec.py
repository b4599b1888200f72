"""The sweep file: load and expand it into runs (load_sweep), the plan table, the sweep folder.

The file's format is in `star-scale sweep --help` (star_scale.sweep.cli).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from star_scale.config import Config, ConfigError, load_config, parse_overrides
from star_scale.sweep.common import SweepError, _atomic_write, short
from star_scale.sweep.costs import model_params, train_flops_per_token, views
from star_scale.trust.credentials import take_credentials

SPEC_KEYS = ("name", "base", "overrides", "tracking", "out", "flops", "max_parallel", "grid", "compute", "fit")
FIT_DEFAULTS = {"metric": "loss", "tail": 0.1, "bootstrap": 200, "huber_delta": 1e-3, "params": "total",
                "level": 0.95}
# Keys the sweep sets for every run: overrides must not set them.
SWEEP_OWNED = ("name", "train.steps", "train.out_dir", "tracking.uri", "tracking.experiment",
               "tracking.experiment_id", "tracking.enabled", "tracking.run_name")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---- parsing helpers -------------------------------------------------------------
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


def _keys(overrides: list[str]) -> list[str]:
    return [key for key, _ in parse_overrides(overrides)]


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
    uri = take_credentials(tracking.get("uri")) or probe.tracking.uri or f"sqlite:///{sweep_dir / 'mlflow.db'}"
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
