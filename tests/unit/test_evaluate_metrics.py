"""ADM metric math on feature arrays: closed forms, scipy oracles, brute-force precision/recall."""
import numpy as np
import pytest
import scipy.linalg
import torch

from star_scale.evaluate.metrics import (ManifoldEstimator, compute_statistics, fid_from_features, frechet_distance,
                                         inception_score, pairwise_sq_distances, precision_recall)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: avoid OpenMP contention on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    assert abs(fid_from_features(feats, feats.copy())) < 1e-6


def test_fid_matches_closed_form_for_diagonal_gaussians():
    # FD(N(m1, diag s1^2), N(m2, diag s2^2)) = |m1 - m2|^2 + sum (s1 - s2)^2
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    expected = np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2)
    assert frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_fid_matches_eigenvalue_oracle_for_full_covariances():
    # tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), an independent route through scipy
    rng = np.random.default_rng(2)
    d = 12
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    r1 = scipy.linalg.sqrtm(s1).real
    tr = np.sum(np.sqrt(np.clip(scipy.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)))
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    m2, s2 = np.full(d, 0.5), np.full(d, 2.0)
    a = rng.normal(size=(n, d))
    b = m2 + s2 * rng.normal(size=(n, d))
    expected = d * 0.5**2 + d * (1.0 - 2.0) ** 2  # = 5
    assert fid_from_features(a, b) == pytest.approx(expected, rel=0.02)


def test_statistics_are_the_adm_ones():
    x = np.random.default_rng(4).normal(size=(50, 5)).astype(np.float32)
    st = compute_statistics(x)
    assert st.mu.dtype == np.float32 and st.sigma.shape == (5, 5)
    np.testing.assert_allclose(st.sigma, np.cov(x.astype(np.float64).T, ddof=1), rtol=1e-6)


def test_singular_covariances_take_the_offset_path():
    # 3 samples in 8 dims: rank-deficient covariances; the result is finite and >= 0
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    fid = fid_from_features(a, b)
    assert np.isfinite(fid) and fid > 0


def test_fid_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="different lengths"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_of_uniform_logits_is_one():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    k = 7
    logits = np.full((70, k), -1e3)
    logits[np.arange(70), np.arange(70) % k] = 0.0  # one-hot predictions, classes balanced
    assert inception_score(logits) == pytest.approx(k, rel=1e-9)


def test_inception_score_known_logits_closed_form():
    # two samples, two classes: p1 = (a, 1-a), p2 = (1-a, a); marginal (1/2, 1/2)
    a = 0.8
    logits = np.log(np.array([[a, 1 - a], [1 - a, a]]))
    kl = a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a))
    assert inception_score(logits) == pytest.approx(np.exp(kl), rel=1e-12)


def test_inception_score_averages_splits():
    # split 1 confident over 2 classes (IS 2), split 2 uniform (IS 1) -> mean 1.5
    confident = np.full((4, 2), -1e3)
    confident[[0, 1, 2, 3], [0, 1, 0, 1]] = 0
    logits = np.concatenate([confident, np.zeros((4, 2))])
    assert inception_score(logits, split_size=4) == pytest.approx(1.5, rel=1e-9)


def test_precision_recall_of_identical_sets_is_one():
    feats = np.random.default_rng(6).normal(size=(300, 32)).astype(np.float32)
    p, r = precision_recall(feats, feats.copy())
    assert p == 1.0 and r == 1.0


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(100, 16))
    p, r = precision_recall(a, a + 100.0)
    assert p == 0.0 and r == 0.0


def brute_force_pr(ref, sam, k=3):
    d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    d_ss = ((sam[:, None] - sam[None]) ** 2).sum(-1)
    r_ref = np.sort(d_rr, axis=1)[:, k]  # index 0 is the point itself
    r_sam = np.sort(d_ss, axis=1)[:, k]
    d = ((ref[:, None] - sam[None]) ** 2).sum(-1)  # (refs, samples)
    precision = np.mean((d <= r_ref[:, None]).any(0))
    recall = np.mean((d <= r_sam[None, :]).any(1))
    return precision, recall


@pytest.mark.parametrize("half", [False, True])
def test_precision_recall_match_brute_force_and_are_batch_invariant(half):
    rng = np.random.default_rng(8)
    ref = rng.normal(size=(120, 6))
    sam = 0.7 * rng.normal(size=(90, 6)) + 0.4  # overlapping but different
    expected = brute_force_pr(ref, sam)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = precision_recall(ref, sam, half=half)
    est = ManifoldEstimator(row_batch_size=17, col_batch_size=23, half=half)
    batched = est.precision_recall(ref, est.radii(ref), sam, est.radii(sam))
    assert batched == got
    tol = 0.03 if half else 1e-12  # float16 distances move a few points across ball borders
    assert got[0] == pytest.approx(expected[0], abs=tol) and got[1] == pytest.approx(expected[1], abs=tol)


def test_radii_are_kth_nearest_neighbour_squared_distances():
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    radii = ManifoldEstimator(k=3, half=False).radii(x)
    # squared distances from 0: 0, 1, 9, 36, 100 -> the third neighbour (itself not counted) is 36
    np.testing.assert_allclose(radii, [36, 25, 9, 25, 81])


def test_half_distances_fall_back_to_float32_on_overflow():
    u = torch.full((2, 4), 300.0)  # |u|^2 = 360000 > float16 max
    v = torch.zeros(3, 4)
    d = pairwise_sq_distances(u, v, half=True)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    assert torch.allclose(d, torch.full((2, 3), 360000.0))


def test_too_few_points_for_k_is_an_error():
    with pytest.raises(ValueError, match="nearest neighbours"):
        ManifoldEstimator(k=3).radii(np.zeros((3, 2)))
