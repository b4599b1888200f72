"""`sweep fit`, step 3: the fit as tables (markdown, CSV) and plots (PNG)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from star_scale.sweep.analysis import frontier_points
from star_scale.sweep.common import _atomic_write, short
from star_scale.sweep.results import RunResult


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
        lines += ["## L(N, D) = E + A / N^a + B / D^b", "",
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
