"""The scaling-law fit (star_scale.sweep.scaling) on synthetic losses from known laws."""
import numpy as np
import pytest

from star_scale.sweep import scaling

CHINCHILLA = dict(E=1.69, A=406.4, a=0.34, B=410.7, b=0.28)


def grid(n_lo=1e6, n_hi=1e9, d_lo=1e8, d_hi=1e11, k=6):
    N, D = np.meshgrid(np.geomspace(n_lo, n_hi, k), np.geomspace(d_lo, d_hi, k))
    return N.ravel(), D.ravel()


def rel(x, truth):
    return abs(x / truth - 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_exponents_within_5_percent(seed):
    N, D = grid()
    L = scaling.synthetic_losses(N, D, **CHINCHILLA, noise=0.005, seed=seed)
    fit = scaling.fit_law(N, D, L)
    assert rel(fit.a, 0.34) < 0.05 and rel(fit.b, 0.28) < 0.05, fit
    truth = scaling.LawFit(**CHINCHILLA)
    assert rel(fit.n_exponent, truth.n_exponent) < 0.05 and rel(fit.d_exponent, truth.d_exponent) < 0.05


def test_noise_free_fit_is_exact_for_other_laws():
    truth = dict(E=0.5, A=30.0, a=0.6, B=2000.0, b=0.45)
    N, D = grid(1e4, 1e7, 1e5, 1e9, k=5)
    fit = scaling.fit_law(N, D, scaling.synthetic_losses(N, D, **truth))
    for key, value in truth.items():
        assert rel(getattr(fit, key), value) < 1e-3, (key, getattr(fit, key))


def test_isoflop_design_recovers_exponents_and_parabola_minima():
    """Compute budgets x sizes (D = C / 6N), as `compute:` sweeps plan them."""
    truth = scaling.LawFit(**CHINCHILLA)
    budgets = np.geomspace(1e17, 1e21, 5)
    C, N = np.meshgrid(budgets, np.geomspace(1e6, 3e9, 9))
    C, N = C.ravel(), N.ravel()
    D = C / (6 * N)
    L = scaling.synthetic_losses(N, D, **CHINCHILLA, noise=0.003, seed=0)
    fit = scaling.fit_law(N, D, L)
    assert rel(fit.a, 0.34) < 0.05 and rel(fit.b, 0.28) < 0.05, fit
    minima = scaling.isoflop_minima(C, N, L)
    assert len(minima) >= 3
    c, n, _ = zip(*minima)
    exponent, _ = scaling.power_law(c, n)
    assert rel(exponent, truth.n_exponent) < 0.05
    for c_, n_, _ in minima:
        assert rel(n_, truth.n_opt(c_)) < 0.15  # approach 2: a parabola through 5 sizes spaced 2.8x apart


def test_bootstrap_intervals_cover_the_truth():
    N, D = grid()
    L = scaling.synthetic_losses(N, D, **CHINCHILLA, noise=0.005, seed=3)
    fit = scaling.fit_law(N, D, L)
    boots = scaling.bootstrap(N, D, L, fit, samples=40, seed=0)
    assert len(boots) >= 35
    for key, truth in (("a", 0.34), ("b", 0.28)):
        lo, hi = scaling.interval([getattr(f, key) for f in boots])
        assert lo < hi and lo < truth * 1.05 and hi > truth * 0.95, (key, lo, hi)
        assert hi - lo < 0.1  # small noise: a tight interval


def test_compute_optimal_allocation_minimises_loss_at_fixed_compute():
    law = scaling.LawFit(**CHINCHILLA)
    for C in (1e18, 1e21, 1e24):
        n = np.geomspace(1e5, 1e13, 200001)
        brute = n[np.argmin(law.predict(n, C / (6 * n)))]
        assert rel(law.n_opt(C), brute) < 1e-3
        assert rel(law.n_opt(C) * law.d_opt(C) * 6, C) < 1e-9
    assert law.n_exponent + law.d_exponent == pytest.approx(1.0)
    # N_opt(C) is a power law with exponent b / (a + b)
    ratio = law.n_opt(1e22) / law.n_opt(1e20)
    assert np.log(ratio) / np.log(100) == pytest.approx(0.28 / 0.62)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_law([1e6, 2e6, 0], [1e8, 1e8, 1e9], [3.0, 2.9, 2.8])
    with pytest.raises(ValueError, match="length"):
        scaling.fit_law([1e6, 2e6], [1e8], [3.0, 2.9])


def test_interval_and_power_law_helpers():
    assert all(np.isnan(scaling.interval([float("nan")])))
    assert scaling.interval(np.arange(101), level=0.9) == pytest.approx((5.0, 95.0))
    x = np.geomspace(1, 1e4, 7)
    exponent, coef = scaling.power_law(x, 3 * x**0.7)
    assert exponent == pytest.approx(0.7) and coef == pytest.approx(3.0)
