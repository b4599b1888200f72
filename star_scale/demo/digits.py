"""Real images for the demo and the repro: scikit-learn's 1,797 handwritten digits (8x8, 10 classes).

They ship with scikit-learn (installed with mlflow), so nothing is downloaded.  Each digit is
upsampled to 32 px and padded to 36 px, so the tokenizer's ten 32 px crops shift the digit
without cutting it; written as an ImageNet-layout folder like any user's images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

DIGITS = [str(d) for d in range(10)]
PAD = 2


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 in 0..255 and (1797,) labels, in scikit-learn's order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def upsample(digit: np.ndarray, size: int = 32) -> Image.Image:
    """One 8x8 digit -> (size + 2 PAD) px RGB, white on black, bilinear."""
    img = Image.fromarray(digit, mode="L").resize((size, size), Image.BILINEAR)
    canvas = Image.new("L", (size + 2 * PAD, size + 2 * PAD), 0)
    canvas.paste(img, (PAD, PAD))
    return canvas.convert("RGB")


def split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) indices: ``val_fraction`` of every class held out."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(val_fraction * len(idx)))
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def make_digit_images(out_dir: str | os.PathLike, indices: Optional[np.ndarray] = None, size: int = 32) -> Path:
    """Write out_dir/<class>_<digit>/<index>.png for the chosen digits (all by default).  Idempotent."""
    images, labels = load_digit_arrays()
    out = Path(out_dir)
    for i in (range(len(labels)) if indices is None else indices):
        folder = out / f"{labels[i]:02d}_{DIGITS[labels[i]]}"
        path = folder / f"{i:05d}.png"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp.png")
            upsample(images[i], size).save(tmp)
            os.replace(tmp, path)
    return out


def real_centre_crops(image_dir: Path, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The folder's images as the generator sees them (centre size x size crop), with their labels."""
    paths = sorted(image_dir.glob("*/*.png"))
    margin = PAD
    images = np.stack([np.asarray(Image.open(p).convert("RGB"))[margin:margin + size, margin:margin + size]
                       for p in paths])
    return images, np.array([int(p.parent.name.split("_")[0]) for p in paths])
