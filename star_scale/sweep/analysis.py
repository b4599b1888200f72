"""`sweep fit`, step 2: fit the law (star_scale.sweep.scaling), bootstrap intervals, the compute-optimal frontier."""
from __future__ import annotations

import math

from star_scale.sweep.results import RunResult


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

    from star_scale.sweep import scaling

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
