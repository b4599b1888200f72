"""The tokenizer interface every image tokenizer of the project implements.

A tokenizer maps uint8 RGB images (N, H, W, 3), H = W = ``image_size``, to
``grid_size * grid_size`` codes per image (row-major over the token grid,
values in [0, codebook_size)), and codes back to uint8 images.  ``name`` and
``weights_hash`` identify it in token stores: a store records both, and a
resumed tokenization refuses a tokenizer with another hash.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

FORMAT_KEY = "star_scale_tokenizer"  # marks files written by Tokenizer.save


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (wrong keys, shapes, format); the message names the file."""


class Tokenizer:
    kind: str = "base"
    name: str
    weights_hash: str
    image_size: int
    grid_size: int
    codebook_size: int

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size * self.grid_size

    def encode(self, images) -> torch.Tensor:
        """uint8 (N, H, W, 3) tensor or ndarray -> int64 codes (N, grid*grid)."""
        raise NotImplementedError

    def decode(self, codes) -> torch.Tensor:
        """int codes (N, grid*grid) -> uint8 images (N, H, W, 3) (a CPU tensor; ``.numpy()`` for PIL)."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        """What a token store records about the tokenizer (JSON-able)."""
        return {"name": self.name, "kind": self.kind, "weights_hash": self.weights_hash, "image_size": self.image_size,
                "grid_size": self.grid_size, "codebook_size": self.codebook_size}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, image_size={self.image_size}, grid={self.grid_size}, "
                f"codebook={self.codebook_size}, hash={self.weights_hash[:12]})")

    # ---- helpers for subclasses -------------------------------------------
    def _images(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(f"{self.name}: expected uint8 images (N, {self.image_size}, {self.image_size}, 3), "
                             f"got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise ValueError(f"{self.name}: expected uint8 images, got {x.dtype}")
        return x

    def _codes(self, codes) -> torch.Tensor:
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        if c.ndim == 1:
            c = c[None]
        if c.ndim != 2 or c.shape[1] != self.tokens_per_image:
            raise ValueError(f"{self.name}: expected codes (N, {self.tokens_per_image}), got {tuple(c.shape)}")
        c = c.to(torch.int64)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook_size):
            raise ValueError(f"{self.name}: codes must lie in [0, {self.codebook_size}), got [{int(c.min())}, {int(c.max())}]")
        return c


def tensors_hash(tensors: dict, extra: dict | None = None) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, sorted by name, plus a JSON config."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if extra:
        h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def reconstruction_grid(tokenizer: Tokenizer, images, cols: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 (H', W', 3) grid: each original image with its decode(encode(.)) to its right."""
    x = tokenizer._images(images)
    rec = tokenizer.decode(tokenizer.encode(x))
    pairs = torch.cat([x, rec], dim=2).numpy()  # (N, S, 2S, 3)
    n, h, w, _ = pairs.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = pairs[i]
    return grid


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio (dB) between two uint8 image batches."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
