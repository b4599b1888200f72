"""`star-scale report RUN_DIR`: a run's curves in one PNG and its last values as a markdown table.

Reads ``metrics.jsonl`` (every step's losses, lr and grad norm; tokens/s and MFU at every
``train.log_every``; probe accuracy at every ``train.probe_every``), writes ``report.png`` and
``report.md`` into the run folder and, when the run was tracked, sends the PNG to its mlflow run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from star_scale import atomic

log = logging.getLogger(__name__)

# (panel title, metric keys drawn in it): L_AR with the total, the ST-AR terms beside it.
PANELS = [("L_AR and total loss", ["loss_ar", "loss"]), ("ST-AR terms", ["loss_mim", "loss_step", "loss_view"]),
          ("probe top-1", ["probe_acc"]), ("tokens/s", ["tokens_per_s"]), ("MFU", ["mfu"]),
          ("grad norm", ["grad_norm"]), ("learning rate", ["lr"])]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; expected a run folder written by `star-scale train`")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: empty; the run has not finished a step yet")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]  # MFU of an unknown device: None
    return [s for s, _ in points], [v for _, v in points]


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (name, keys) in zip(axes.flat, PANELS):
        drawn = False
        for key in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            unknown = any(k in r for r in records for k in keys)  # logged as None: MFU without a peak FLOP/s
            ax.text(0.5, 0.5, "unknown on this device" if unknown else "not logged in this run", ha="center",
                    va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes.flat[-1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def last_values_table(records: list[dict]) -> str:
    keys = [k for _, ks in PANELS for k in ks] + sorted({k for r in records for k in r} - {"step"} -
                                                        {k for _, ks in PANELS for k in ks})
    rows = ["| metric | step | last value |", "|---|---|---|"]
    for key in keys:
        steps, values = series(records, key)
        if steps:
            rows.append(f"| {key} | {steps[-1]} | {values[-1]:.6g} |")
        elif any(key in r for r in records):  # logged, never known (MFU on a device without a peak)
            rows.append(f"| {key} | {max(r['step'] for r in records if key in r)} | unknown |")
    return "\n".join(rows) + "\n"


def mlflow_run(run_dir: Path):
    """(client, run id) of the run's mlflow run, or None when the run was not tracked."""
    from star_scale.config import load_config
    from star_scale.train.tracking import default_uri

    cfg = load_config(str(run_dir / "config.yaml")) if (run_dir / "config.yaml").is_file() else None
    if cfg is None or not cfg.tracking.enabled:
        return None
    uri = cfg.tracking.uri or default_uri(run_dir)
    if not cfg.tracking.uri and not (run_dir / "mlflow.db").is_file():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    name = cfg.tracking.run_name or cfg.name
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return (client, runs[0].info.run_id) if runs else None


def write_report(run_dir: str | Path, mlflow: bool = True) -> dict:
    """report.png + report.md in the run folder (and the PNG as an mlflow artifact); returns their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    png, md = run_dir / "report.png", run_dir / "report.md"
    plot(records, png, f"{run_dir.name}: {records[-1]['step']} steps")
    atomic.write_text(md, f"# {run_dir.name}: last values\n\n" + last_values_table(records))
    out = {"png": str(png), "md": str(md), "mlflow_run_id": None}
    if mlflow:
        found = mlflow_run(run_dir)
        if found is not None:
            client, run_id = found
            client.log_artifact(run_id, str(png))
            out["mlflow_run_id"] = run_id
    return out


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="star-scale report", description=__doc__)
    p.add_argument("run_dir", help="a run folder (train.out_dir): holds metrics.jsonl and config.yaml")
    p.add_argument("--no-mlflow", action="store_true", help="do not send the PNG to the run's mlflow run")
    args = p.parse_args(argv)
    try:
        out = write_report(args.run_dir, mlflow=not args.no_mlflow)
    except (FileNotFoundError, ValueError) as e:
        print(f"star-scale report: error: {e}", file=sys.stderr)
        return 2
    print(f"{out['png']}\n{out['md']}" + (f"\nmlflow run {out['mlflow_run_id']}: report.png" if out["mlflow_run_id"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
