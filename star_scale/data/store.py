"""Token stores: (N, crops, T) uint16 codes + (N,) int32 labels, read in contiguous chunks.

Every store offers the same small interface so the loader does not care where
the tokens live: ``len(store)``, ``store.crops``, ``store.tokens_per_image``,
``store.chunk_size``, ``store.read(start, stop) -> (codes, labels)``,
``store.read_chunk(i)``, ``store.all_labels()`` and ``store.attrs``.  Rows
whose label is negative are skipped images (see ``schema.py``) and are never
served by the loader.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from star_scale import atomic
from star_scale.data.chunks import ChunkReads


class ArrayStore(ChunkReads):
    """Tokens held in memory (the demo's small .npz, tests)."""

    def __init__(self, codes: np.ndarray, labels: np.ndarray, chunk_size: int = 256, attrs: dict | None = None):
        codes, labels = np.asarray(codes), np.asarray(labels)
        if codes.ndim != 3 or labels.shape != (codes.shape[0],):
            raise ValueError(f"expected codes (N, crops, T) and labels (N,), got {codes.shape} and {labels.shape}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.codes, self.labels = codes, labels
        self.chunk_size = chunk_size
        self.attrs = dict(attrs or {})

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def crops(self) -> int:
        return self.codes.shape[1]

    @property
    def tokens_per_image(self) -> int:
        return self.codes.shape[2]

    @property
    def num_classes(self) -> int | None:
        n = self.attrs.get("num_classes")
        return int(n) if n is not None else None

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.attrs.get("tokenizer_path")
        return Path(str(p)) if p else None

    def all_labels(self) -> np.ndarray:
        """Every row's label (rows with label < 0 are skipped images, never served)."""
        return self.labels

    def read(self, start: int, stop: int, out: np.ndarray | None = None):
        codes = self.codes[start:stop]
        if out is not None:
            out[...] = codes
            codes = out
        return codes, self.labels[start:stop]


def save_npz_store(path: str | os.PathLike, codes: np.ndarray, labels: np.ndarray, **attrs) -> None:
    with atomic.replacing(path) as f:
        np.savez(f, codes=codes, labels=labels, **{f"attr_{k}": np.asarray(v) for k, v in attrs.items()})


def open_store(path: str | os.PathLike, **kwargs):
    """Open a token store by path: a ``.npz`` file (in memory) or a Zarr group (``ZarrStore``;
    ``kwargs`` go to it, e.g. ``allow_incomplete=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"token store {str(path)!r} does not exist (build one with `star-scale tokenize`)")
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as f:
            attrs = {k[5:]: f[k].tolist() for k in f.files if k.startswith("attr_")}
            return ArrayStore(f["codes"], f["labels"], chunk_size=int(attrs.get("chunk_size", 256)), attrs=attrs)
    from star_scale.data.zarr_store import ZarrStore  # the offline pipeline's format

    return ZarrStore(path, **kwargs)
