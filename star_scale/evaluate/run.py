"""The ADM evaluation of a sample batch against a reference batch: features -> five numbers."""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from star_scale.evaluate.adm_npz import npz_keys, read_statistics
from star_scale.evaluate.features import features_of, is_feature_file
from star_scale.evaluate.metrics import (FIDStatistics, compute_statistics, fid_from_stats, inception_score,
                                         precision_recall)

log = logging.getLogger(__name__)


def metrics_from_features(sample: dict, ref: Optional[dict] = None, ref_stats: Optional[dict] = None,
                          k: int = 3, split_size: int = 5000, half: bool = True, device=None) -> dict:
    """FID, sFID, IS, precision, recall from feature dicts ({'pool', 'spatial', 'logits'} arrays).

    ref_stats: precomputed {'mu', 'sigma', 'mu_s', 'sigma_s'}; when given they are used for
    FID/sFID (as the ADM evaluator does), and ``ref`` only for precision/recall.
    Metrics whose inputs are missing are left out.
    """
    out = {"num_samples": int(len(sample["pool"])), "inception_score": inception_score(sample["logits"], split_size)}
    if ref_stats is not None:
        ref_pool = FIDStatistics(ref_stats["mu"], ref_stats["sigma"])
        ref_spatial = FIDStatistics(ref_stats["mu_s"], ref_stats["sigma_s"])
    elif ref is not None:
        ref_pool, ref_spatial = compute_statistics(ref["pool"]), compute_statistics(ref["spatial"])
    else:
        return out
    out["fid"] = fid_from_stats(compute_statistics(sample["pool"]), ref_pool)
    out["sfid"] = fid_from_stats(compute_statistics(sample["spatial"]), ref_spatial)
    if ref is not None:
        out["num_reference"] = int(len(ref["pool"]))
        out["precision"], out["recall"] = precision_recall(ref["pool"], sample["pool"], k=k, half=half, device=device)
    return out


def evaluate_npz(sample_path: str | os.PathLike, ref_path: Optional[str | os.PathLike] = None,
                 inception_weights: Optional[str | os.PathLike] = None, batch_size: int = 64, device="cpu",
                 cache_dir: Optional[str | os.PathLike] = None, limit: Optional[int] = None,
                 save_sample_features: Optional[str | os.PathLike] = None, half: bool = True) -> dict:
    """Evaluate an ADM sample .npz (or feature file) against an ADM reference batch (or feature file)."""
    model = None

    def model_fn():
        nonlocal model
        if model is None:
            if inception_weights is None:
                raise ValueError("computing Inception features of images needs --inception-weights "
                                 "(pt_inception-2015-12-05-6726825d.pth); feature files need none")
            from star_scale.evaluate.inception import load_inception
            model = load_inception(inception_weights, device)
        return model

    sample = features_of(sample_path, model_fn, batch_size, device, cache_dir, limit)
    if save_sample_features:
        from star_scale.evaluate.features import save_feature_file
        save_feature_file(save_sample_features, sample)
    ref = ref_stats = None
    if ref_path is not None:
        ref_stats = None if is_feature_file(ref_path) else read_statistics(ref_path)
        if is_feature_file(ref_path) or "arr_0" in npz_keys(ref_path):
            ref = features_of(ref_path, model_fn, batch_size, device, cache_dir)
        else:
            log.warning("%s has no arr_0 images: precision and recall need them and are skipped", ref_path)
        if ref is None and ref_stats is None:
            raise KeyError(f"{ref_path}: neither arr_0 images nor mu/sigma/mu_s/sigma_s statistics")
    result = metrics_from_features(sample, ref, ref_stats, half=half, device=device)
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in result.items()}
