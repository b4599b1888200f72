"""Inception features of ADM image batches, and the feature files that cache them.

A feature file is an .npz with ``pool`` (N, 2048), ``spatial`` (N, 2023) and, when the
weights have the classifier, ``logits`` (N, 1008) float32 arrays: what the ADM evaluator
computes from ``arr_0`` before any metric.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from star_scale.console.progress import progress

from star_scale.evaluate.adm_npz import check_images, iter_npz_batches, npz_keys, write_npz_streaming

FEATURE_KEYS = ("pool", "spatial", "logits")
REQUIRED_KEYS = ("pool", "spatial")  # logits only come with the classifier (pytorch-fid's weights)


@torch.no_grad()
def compute_features(model: Callable, batches: Iterable[np.ndarray], device="cpu", total: Optional[int] = None,
                     desc: str = "inception", show: bool = True) -> dict:
    """Run (n, H, W, 3) uint8 batches through the Inception model -> {'pool', 'spatial', 'logits'} arrays."""
    parts = {}
    with progress(total=total, desc=desc, unit="img", leave=False, disable=not show) as bar:
        for batch in batches:
            out = model(torch.from_numpy(np.array(batch, copy=True)).to(device))  # streamed batches are read-only
            for k in FEATURE_KEYS:
                if k in out:
                    parts.setdefault(k, []).append(out[k].cpu().numpy().astype(np.float32))
            bar.update(len(batch))
    if not parts:
        raise ValueError("no images to compute features of")
    return {k: np.concatenate(v) for k, v in parts.items()}


def is_feature_file(path: str | os.PathLike) -> bool:
    return set(REQUIRED_KEYS) <= set(npz_keys(path))


def load_feature_file(path: str | os.PathLike) -> dict:
    with np.load(path) as f:
        missing = [k for k in REQUIRED_KEYS if k not in f.files]
        if missing:
            raise KeyError(f"{path}: not a feature file, it lacks {missing}")
        return {k: f[k] for k in FEATURE_KEYS if k in f.files}


def save_feature_file(path: str | os.PathLike, feats: dict) -> None:
    write_npz_streaming(path, {k: np.asarray(feats[k], dtype=np.float32) for k in FEATURE_KEYS if k in feats})


def _cache_path(cache_dir: Path, path: Path, weights: str) -> Path:
    st = path.stat()
    return cache_dir / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-{weights}.inception.npz"


def features_of(path: str | os.PathLike, model_fn: Callable[[], Callable], batch_size: int = 64, device="cpu",
                cache_dir: Optional[str | os.PathLike] = None, limit: Optional[int] = None,
                weights: str = "default") -> dict:
    """Features of an ADM .npz (``arr_0`` images) or a feature file.

    model_fn: returns the Inception model; called only when images must be processed.
    cache_dir: keep computed features there, keyed by file name, size, mtime and ``weights`` (a tag).
    """
    path = Path(path)
    if is_feature_file(path):
        feats = load_feature_file(path)
        return {k: v[:limit] for k, v in feats.items()} if limit else feats
    shape = check_images(path)
    cached = _cache_path(Path(cache_dir), path, weights) if cache_dir and not limit else None
    if cached is not None and cached.exists():
        return load_feature_file(cached)
    n = shape[0] if limit is None else min(limit, shape[0])
    feats = compute_features(model_fn(), iter_npz_batches(path, "arr_0", batch_size, limit=n), device, total=n,
                             desc=f"inception {path.name}")
    if cached is not None:
        save_feature_file(cached, feats)
    return feats
