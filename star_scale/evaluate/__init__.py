"""ADM-style evaluation: FID, sFID, Inception Score, precision/recall; the .npz formats it reads.

Metric functions work on feature arrays and need no Inception weights; images go through
``inception.load_inception(path)`` first.  ``main`` is `star-scale evaluate`.
"""
from star_scale.evaluate.adm_npz import iter_npz_batches, read_statistics, write_npz_streaming
from star_scale.evaluate.cli import main
from star_scale.evaluate.metrics import (FIDStatistics, ManifoldEstimator, compute_statistics, fid_from_features,
                                         fid_from_stats, frechet_distance, inception_score, precision_recall)
from star_scale.evaluate.run import evaluate_npz, metrics_from_features

__all__ = [
    "FIDStatistics", "ManifoldEstimator", "compute_statistics", "evaluate_npz", "fid_from_features", "fid_from_stats",
    "frechet_distance", "inception_score", "iter_npz_batches", "main", "metrics_from_features", "precision_recall",
    "read_statistics", "write_npz_streaming",
]
