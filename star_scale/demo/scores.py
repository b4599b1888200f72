"""The demo's numbers: a judge of class accuracy, and Inception FID against the real images."""
from __future__ import annotations

import logging

import numpy as np

from star_scale.demo.repro.judge import Judge, judge_outputs, train_judge

log = logging.getLogger(__name__)


def train_demo_judge(store, tokenizer, num_classes: int, epochs: int, image_size: int,
                     fit_fraction: float = 0.8) -> tuple[Judge, float]:
    """A small CNN on the tokenizer's reconstructions of the real images, all ten crops (so shifts
    do not fool it); fitted on the store's first rows, scored on the rest.  Returns (judge, held-out accuracy)."""
    codes, labels = store.read(0, len(store))
    codes, labels = np.asarray(codes).astype(np.int64), np.asarray(labels).astype(np.int64)
    n, crops, t = codes.shape
    decoded = np.asarray(tokenizer.decode(codes.reshape(n * crops, t))).reshape(n, crops, image_size, image_size, 3)
    fit = int(fit_fraction * n)
    judge = train_judge(decoded[:fit], labels[:fit], num_classes, epochs)
    _, pred = judge_outputs(judge, decoded[fit:].reshape(-1, image_size, image_size, 3))
    return judge, float((pred == np.repeat(labels[fit:], crops)).mean())


def judge_accuracy(judge: Judge, images: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    _, pred = judge_outputs(judge, images)
    classes = np.unique(labels)
    return float((pred == labels).mean()), [float((pred[labels == c] == c).mean()) for c in classes]


def inception_pool(model, images: np.ndarray, desc: str, show: bool = True, batch_size: int = 50) -> np.ndarray:
    """pool_3 features (float64) of ``model``, the default FID Inception (``evaluate.run.load_weights(None, ...)``)."""
    from star_scale.evaluate.features import compute_features

    batches = (images[s: s + batch_size] for s in range(0, len(images), batch_size))
    return compute_features(model, batches, total=len(images), desc=desc, show=show)["pool"].astype(np.float64)
