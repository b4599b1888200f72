"""Scaling-law fitting: L(N, D) = E + A / N^a + B / D^b and its compute-optimal frontier.

The fit follows Chinchilla's approach 3 (Hoffmann et al. 2022, appendix D.2):
minimise the Huber loss of log L_pred - log L_obs, with the prediction written
as a log-sum-exp, log L = LSE(e, log A - a log N, log B - b log D), so every
parameter lives on a well-conditioned scale.  The start is robust instead of a
3600-point optimiser grid: for every (a, b) on a grid the law is linear in
(E, A, B), solved by non-negative least squares on relative errors; the best
few (a, b) start L-BFGS.  Confidence intervals come from a bootstrap over runs.

Compute-optimal allocation under C = k N D (k = 6 for the usual 6ND):
    N_opt(C) = G (C/k)^(b/(a+b)),  D_opt(C) = G^-1 (C/k)^(a/(a+b)),  G = (aA / (bB))^(1/(a+b)).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

# Exponent grid for the linear (variable projection) start: 0.02 .. 2.5, log spaced.
EXPONENT_GRID = np.geomspace(0.02, 2.5, 36)
COARSE_GRID = np.geomspace(0.02, 2.5, 10)
BOUNDS = [(-30.0, 30.0), (-30.0, 200.0), (-30.0, 200.0), (1e-4, 5.0), (1e-4, 5.0)]  # e, log A, log B, a, b


@dataclass
class LawFit:
    """L(N, D) = E + A / N^a + B / D^b; objective: the Huber loss the fit reached."""
    E: float
    A: float
    a: float
    B: float
    b: float
    objective: float = float("nan")

    # ---- the law --------------------------------------------------------------
    def predict(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.a + self.B / D**self.b

    # ---- the compute-optimal frontier under C = k N D ---------------------------
    @property
    def n_exponent(self) -> float:
        return self.b / (self.a + self.b)

    @property
    def d_exponent(self) -> float:
        return self.a / (self.a + self.b)

    @property
    def G(self) -> float:
        return math.exp((math.log(self.a * self.A) - math.log(self.b * self.B)) / (self.a + self.b))

    def n_opt(self, C, k: float = 6.0):
        return self.G * (np.asarray(C, dtype=float) / k) ** self.n_exponent

    def d_opt(self, C, k: float = 6.0):
        return (np.asarray(C, dtype=float) / k) / self.n_opt(C, k)

    def loss_opt(self, C, k: float = 6.0):
        return self.predict(self.n_opt(C, k), self.d_opt(C, k))

    def theta(self) -> np.ndarray:
        return np.array([math.log(max(self.E, 1e-300)), math.log(self.A), math.log(self.B), self.a, self.b])

    @classmethod
    def from_theta(cls, theta, objective: float = float("nan")) -> "LawFit":
        e, la, lb, a, b = (float(x) for x in theta)
        return cls(E=math.exp(e), A=math.exp(la), a=a, B=math.exp(lb), b=b, objective=objective)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(n_exponent=self.n_exponent, d_exponent=self.d_exponent, G=self.G)
        return out


# ---- the objective ---------------------------------------------------------------
def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber values and derivatives."""
    a = np.abs(r)
    small = a <= delta
    value = np.where(small, 0.5 * r**2, delta * (a - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float):
    e, la, lb, a, b = theta
    terms = np.stack([np.full_like(logN, e), la - a * logN, lb - b * logD])  # (3, n)
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    s = w.sum(axis=0)
    lse = top + np.log(s)
    w /= s  # softmax weights: d lse / d term
    value, g = _huber(lse - logL, delta)
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[1] * logN).sum(), -(g * w[2] * logD).sum()])
    return value.sum(), grad


def _linear_starts(N, D, L, grid: np.ndarray, keep: int) -> list[np.ndarray]:
    """For each (a, b) on the grid, (E, A, B) >= 0 by NNLS on relative errors; the best `keep` as thetas."""
    from scipy.optimize import nnls

    scored = []
    for a in grid:
        x = N ** -a
        x_scale = x.max()
        for b in grid:
            y = D ** -b
            y_scale = y.max()
            M = np.stack([np.ones_like(L), x / x_scale, y / y_scale], axis=1) / L[:, None]
            coef, rnorm = nnls(M, np.ones_like(L))
            E, A, B = coef[0], coef[1] / x_scale, coef[2] / y_scale
            scored.append((rnorm, E, A, B, a, b))
    scored.sort(key=lambda t: t[0])
    starts = []
    for _, E, A, B, a, b in scored[:keep]:
        # A term NNLS zeroed still needs a finite log: start it small instead.
        floor = 1e-3 * float(L.min())
        starts.append(np.array([math.log(max(E, floor)), math.log(max(A, floor * N.min() ** a)),
                                math.log(max(B, floor * D.min() ** b)), a, b]))
    return starts


def _refine(starts, logN, logD, logL, delta) -> Optional[LawFit]:
    from scipy.optimize import minimize

    best = None
    for theta0 in starts:
        theta0 = np.clip(theta0, [lo for lo, _ in BOUNDS], [hi for _, hi in BOUNDS])
        res = minimize(_objective, theta0, args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B",
                       bounds=BOUNDS, options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-9})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    return None if best is None else LawFit.from_theta(best.x, float(best.fun))


def one_blas_thread(fn):
    """Run `fn` with BLAS on one thread: on 5-parameter problems extra threads only spin (10x slower on a
    busy machine)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
            limit = threadpool_limits(1)
        except ImportError:
            limit = contextlib.nullcontext()
        with limit:
            return fn(*args, **kwargs)
    return wrapper


def _arrays(N, D, L):
    N, D, L = (np.asarray(v, dtype=float).ravel() for v in (N, D, L))
    if not (len(N) == len(D) == len(L)):
        raise ValueError(f"N, D and L differ in length: {len(N)}, {len(D)}, {len(L)}")
    if len(L) < 1 or np.any(N <= 0) or np.any(D <= 0) or np.any(L <= 0) or not np.all(np.isfinite(L)):
        raise ValueError("scaling fit needs positive, finite N, D and losses")
    return N, D, L


@one_blas_thread
def fit_law(N, D, L, delta: float = 1e-3, grid: np.ndarray = EXPONENT_GRID, starts: int = 8,
            extra_starts: Sequence[np.ndarray] = ()) -> LawFit:
    """Fit L(N, D) = E + A/N^a + B/D^b to observed final losses (Huber in log space)."""
    N, D, L = _arrays(N, D, L)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    fit = _refine([*_linear_starts(N, D, L, grid, starts), *extra_starts], logN, logD, logL, delta)
    if fit is None:
        raise RuntimeError("scaling fit failed: no start converged to finite parameters")
    return fit


@one_blas_thread
def bootstrap(N, D, L, fit: LawFit, samples: int = 200, seed: int = 0, delta: float = 1e-3) -> list[LawFit]:
    """Refits on runs resampled with replacement (start: the full fit and a coarse linear grid)."""
    N, D, L = _arrays(N, D, L)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        idx = rng.integers(0, len(L), len(L))
        n, d, l_ = N[idx], D[idx], L[idx]
        try:
            starts = [fit.theta(), *_linear_starts(n, d, l_, COARSE_GRID, 1)]
            f = _refine(starts, np.log(n), np.log(d), np.log(l_), delta)
        except (ValueError, FloatingPointError):
            f = None
        if f is not None:
            out.append(f)
    return out


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval; (nan, nan) without finite values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def synthetic_losses(N, D, E: float, A: float, a: float, B: float, b: float, noise: float = 0.0,
                     seed: int = 0) -> np.ndarray:
    """Losses from a known law with multiplicative log-normal noise (relative std `noise`)."""
    L = LawFit(E, A, a, B, b).predict(N, D)
    if noise:
        L = L * np.exp(np.random.default_rng(seed).normal(0.0, noise, np.shape(L)))
    return L


def power_law(x, y) -> tuple[float, float]:
    """(exponent, coefficient) of y = coefficient * x^exponent by least squares in log-log."""
    x, y = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(math.exp(intercept))


def isoflop_minima(C, N, L, rel_tol: float = 0.02, window: int = 5) -> list[tuple[float, float, float]]:
    """Chinchilla approach 2: per compute budget (runs whose C agree within rel_tol), a parabola of L over
    log N through the `window` sizes around the lowest loss; its minimum (C, N_opt, L_min).  Budgets whose
    lowest loss sits at the smallest or largest size (minimum not bracketed) or with < 3 sizes are skipped."""
    C, N, L = (np.asarray(v, dtype=float) for v in (C, N, L))
    order = np.argsort(C)
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(C[i] / C[groups[-1][0]] - 1) <= rel_tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for g in groups:
        g = sorted(g, key=lambda i: N[i])
        if len({N[i] for i in g}) < 3:
            continue
        best = min(range(len(g)), key=lambda j: L[g[j]])
        if best in (0, len(g) - 1):
            continue
        lo = max(0, min(best - window // 2, len(g) - window))
        sel = g[lo:lo + window]
        x, y = np.log(N[sel]), L[sel]
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            continue
        xm = -c1 / (2 * c2)
        if not x.min() <= xm <= x.max():
            continue
        out.append((float(np.exp(np.mean(np.log(C[g])))), float(np.exp(xm)), float(c0 + c1 * xm + c2 * xm**2)))
    return out
