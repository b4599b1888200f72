"""FID, sFID, Inception Score, precision and recall on feature arrays, as the ADM evaluator computes them.

The formulas follow openai/guided-diffusion ``evaluations/evaluator.py``:

- statistics: ``mu = mean(acts, 0)`` (in the activations' dtype), ``sigma = np.cov(acts, rowvar=False)``;
- Frechet distance: ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))`` with scipy's
  ``sqrtm``; if that is not finite, ``eps = 1e-6`` is added to both diagonals and it is retried;
  an imaginary part is dropped unless the diagonal's exceeds 1e-3 (then ValueError);
- Inception Score: softmax of the pool_3 features times the final layer's weight (no bias),
  ``exp(mean_i KL(p_i || mean p))`` per consecutive split of 5000 samples, averaged over splits;
- precision / recall (improved precision and recall, Kynkaanniemi et al.): squared Euclidean
  distances (computed in float16, or float32 when float16 overflows), the radius of each point
  is the distance to its k = 3rd nearest neighbour (the point itself counts as the 0th);
  precision = fraction of samples inside some reference ball, recall = fraction of references
  inside some sample ball.

Only the last two use torch (on any device); everything else is numpy/scipy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class FIDStatistics:
    mu: np.ndarray
    sigma: np.ndarray


def compute_statistics(activations: np.ndarray) -> FIDStatistics:
    """Mean and covariance of (N, D) activations, as the ADM evaluator computes them."""
    activations = np.asarray(activations)
    if activations.ndim != 2 or activations.shape[0] < 2:
        raise ValueError(f"statistics need (N >= 2, D) activations, got shape {activations.shape}")
    return FIDStatistics(np.mean(activations, axis=0), np.cov(activations, rowvar=False))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on singular products; checked below
        return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between two Gaussians given by mean and covariance (the ADM formula)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different shapes: {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(a: FIDStatistics, b: FIDStatistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return fid_from_stats(compute_statistics(features_a), compute_statistics(features_b))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """IS from (N, C) logits: exp(E KL(p(y|x) || p(y))) per split of ``split_size`` rows, averaged.

    Where a probability underflows to exactly 0 the ADM code yields NaN; here 0 log 0 = 0.
    """
    preds = softmax(logits)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


# ---- precision and recall ------------------------------------------------------------
def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, half: bool = True) -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared distances |u|^2 - 2 u.v + |v|^2, clamped at 0.

    half: compute in float16 first (the ADM evaluator's choice) and fall back to float32
    when any entry is not finite.  The result is float32.
    """
    def dist(a, b):
        na = a.pow(2).sum(1, keepdim=True)
        nb = b.pow(2).sum(1, keepdim=True).T
        return torch.clamp(na - 2 * a @ b.T + nb, min=0)

    if half:
        d = dist(u.half(), v.half())
        if torch.isfinite(d).all():
            return d.float()
    return dist(u.float(), v.float())


class ManifoldEstimator:
    """k-NN hypersphere manifolds of feature sets; batches rows and columns to bound memory."""

    def __init__(self, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000,
                 half: bool = True, device: Optional[torch.device | str] = None):
        self.k, self.row, self.col, self.half = k, row_batch_size, col_batch_size, half
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def radii(self, features: np.ndarray) -> np.ndarray:
        """(N,) squared distance from each point to its k-th nearest neighbour (itself being the 0th)."""
        feats = self._t(features)
        n = feats.shape[0]
        if n <= self.k:
            raise ValueError(f"k = {self.k} nearest neighbours need more than {self.k} feature vectors, got {n}")
        out = np.zeros(n, dtype=np.float32)
        for r0 in range(0, n, self.row):
            rows = feats[r0 : r0 + self.row]
            d = torch.cat([pairwise_sq_distances(rows, feats[c0 : c0 + self.col], self.half)
                           for c0 in range(0, n, self.col)], dim=1)
            out[r0 : r0 + len(rows)] = torch.kthvalue(d, self.k + 1, dim=1).values.cpu().numpy()
        return out

    def precision_recall(self, ref: np.ndarray, ref_radii: np.ndarray,
                         sample: np.ndarray, sample_radii: np.ndarray) -> tuple[float, float]:
        """(precision, recall): samples inside any reference ball, references inside any sample ball."""
        ref_t, sam_t = self._t(ref), self._t(sample)
        r_ref = torch.as_tensor(ref_radii, dtype=torch.float32, device=self.device)
        r_sam = torch.as_tensor(sample_radii, dtype=torch.float32, device=self.device)
        ref_in = torch.zeros(len(ref_t), dtype=torch.bool, device=self.device)
        sam_in = torch.zeros(len(sam_t), dtype=torch.bool, device=self.device)
        for r0 in range(0, len(ref_t), self.row):
            r1 = r0 + self.row
            for c0 in range(0, len(sam_t), self.col):
                c1 = c0 + self.col
                d = pairwise_sq_distances(ref_t[r0:r1], sam_t[c0:c1], self.half)  # (refs, samples)
                ref_in[r0:r1] |= (d <= r_sam[None, c0:c1]).any(dim=1)
                sam_in[c0:c1] |= (d <= r_ref[r0:r1, None]).any(dim=0)
        return float(sam_in.double().mean()), float(ref_in.double().mean())


def precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3, half: bool = True,
                     device: Optional[torch.device | str] = None) -> tuple[float, float]:
    """Improved precision and recall of ``sample`` against ``ref`` (both (N, D) features)."""
    est = ManifoldEstimator(k=k, half=half, device=device)
    return est.precision_recall(ref, est.radii(ref), sample, est.radii(sample))
