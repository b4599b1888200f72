"""A small CPU tokenizer: a k-means codebook over non-overlapping RGB patches.

For machines without the LlamaGen VQ weights (the demo, CI): 32x32 images,
4x4 patches -> an 8x8 grid (T = 64), 512 codes of 48 pixel values each.  It is
fitted in a second or two on a few thousand images' patches with k-means++
seeding and Lloyd iterations in torch, deterministic from a seed.  Encoding is
nearest-codeword, decoding pastes the codewords back: on flat, coloured shapes
the reconstructions look like the originals (edges get slightly blocky).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from star_scale import atomic
from star_scale.tokenizer.base import FORMAT_KEY, Tokenizer, TokenizerError, tensors_hash


class PatchTokenizer(Tokenizer):
    kind = "patch_kmeans"

    def __init__(self, codebook: torch.Tensor, image_size: int = 32, patch: int = 4, batch_size: int = 2048):
        codebook = torch.as_tensor(codebook, dtype=torch.float32).contiguous()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        if codebook.ndim != 2 or codebook.shape[1] != patch * patch * 3:
            raise ValueError(f"codebook must be (K, {patch * patch * 3}) for {patch}x{patch} RGB patches, got {tuple(codebook.shape)}")
        self.codebook = codebook  # (K, p*p*3) pixel values in [0, 1]
        self._sq = (codebook * codebook).sum(1)
        self.patch, self.image_size = patch, image_size
        self.grid_size = image_size // patch
        self.codebook_size = codebook.shape[0]
        self.batch_size = batch_size
        self.name = f"patch-kmeans-{self.codebook_size}-p{patch}-{image_size}px"
        self.weights_hash = tensors_hash({"codebook": codebook}, {"kind": self.kind, "patch": patch, "image_size": image_size})

    # ---- patches <-> images ---------------------------------------------
    def _to_patches(self, x: torch.Tensor) -> torch.Tensor:
        n, g, p = x.shape[0], self.grid_size, self.patch
        return x.reshape(n, g, p, g, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(n, g * g, p * p * 3)

    def _from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        n, g, p = patches.shape[0], self.grid_size, self.patch
        return patches.reshape(n, g, g, p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(n, g * p, g * p, 3)

    def encode(self, images) -> torch.Tensor:
        x = self._images(images)
        out = torch.empty((x.shape[0], self.tokens_per_image), dtype=torch.int64)
        with torch.no_grad():
            for s in range(0, x.shape[0], self.batch_size):
                patches = self._to_patches(x[s: s + self.batch_size].to(torch.float32) / 255.0).reshape(-1, self.codebook.shape[1])
                out[s: s + self.batch_size] = _nearest(patches, self.codebook, self._sq).reshape(-1, self.tokens_per_image)
        return out

    def decode(self, codes) -> torch.Tensor:
        c = self._codes(codes)
        with torch.no_grad():
            patches = self.codebook[c]  # (N, T, D)
            return (self._from_patches(patches) * 255.0).round_().clamp_(0, 255).to(torch.uint8)

    # ---- persistence -------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        atomic.torch_save({FORMAT_KEY: {"kind": self.kind, "image_size": self.image_size, "patch": self.patch,
                                        "weights_hash": self.weights_hash},
                           "codebook": self.codebook}, path)

    @classmethod
    def from_saved(cls, obj: dict, path: str = "<memory>") -> "PatchTokenizer":
        meta = obj[FORMAT_KEY]
        if "codebook" not in obj:
            raise TokenizerError(f"{path}: patch tokenizer file has no 'codebook' tensor")
        tok = cls(obj["codebook"], image_size=int(meta["image_size"]), patch=int(meta["patch"]))
        if meta.get("weights_hash") not in (None, tok.weights_hash):
            raise TokenizerError(f"{path}: stored weights hash {meta['weights_hash'][:12]} does not match the codebook "
                                 f"({tok.weights_hash[:12]}): the file is corrupt")
        return tok

    # ---- fitting -------------------------------------------------------------
    @classmethod
    def fit(cls, images, codebook_size: int = 512, patch: int = 4, *, max_patches: int = 32768, iters: int = 20,
            seed: int = 0) -> "PatchTokenizer":
        """Fit on uint8 images (N, S, S, 3): k-means++ then Lloyd, deterministic from ``seed``."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2] or x.dtype != torch.uint8:
            raise ValueError(f"fit expects square uint8 images (N, S, S, 3), got {tuple(x.shape)} {x.dtype}")
        size = int(x.shape[1])
        probe = cls(torch.zeros(1, patch * patch * 3), image_size=size, patch=patch)
        gen = torch.Generator().manual_seed(int(seed))
        patches = probe._to_patches(x.to(torch.float32) / 255.0).reshape(-1, patch * patch * 3)
        if patches.shape[0] > max_patches:
            patches = patches[torch.randperm(patches.shape[0], generator=gen)[:max_patches]]
        codebook = kmeans(patches, codebook_size, iters=iters, generator=gen)
        return cls(codebook, image_size=size, patch=patch)


def _nearest(x: torch.Tensor, centers: torch.Tensor, centers_sq: torch.Tensor | None = None) -> torch.Tensor:
    if centers_sq is None:
        centers_sq = (centers * centers).sum(1)
    return torch.addmm(centers_sq[None, :], x, centers.T, alpha=-2.0).argmin(1)  # |x|^2: same for every centre


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, init_points: int = 8192,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``x`` (n, d), k-means++ seeding on a subsample of ``init_points``
    rows; returns (k, d) centres.  Deterministic for a given generator state.

    Runs on one thread: the seeding is hundreds of small ops, and on a busy machine OpenMP's
    synchronisation makes them 30x slower with 2 threads than with 1 (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _kmeans(x, k, iters=iters, init_points=init_points, generator=generator)
    finally:
        torch.set_num_threads(threads)


def _kmeans(x: torch.Tensor, k: int, *, iters: int, init_points: int, generator) -> torch.Tensor:
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    gen = generator or torch.Generator().manual_seed(0)
    x = x.to(torch.float32).contiguous()
    pool = x if n <= init_points else x[torch.randperm(n, generator=gen)[:init_points]]
    centers = torch.empty((k, x.shape[1]), dtype=torch.float32)
    centers[0] = pool[torch.randint(len(pool), (1,), generator=gen)]
    d2 = ((pool - centers[0]) ** 2).sum(1)
    for i in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than centres: duplicates are harmless
            j = torch.randint(len(pool), (1,), generator=gen)
        else:
            j = torch.multinomial(d2 / total, 1, generator=gen)
        centers[i] = pool[j]
        d2 = torch.minimum(d2, ((pool - centers[i]) ** 2).sum(1))
    x_sq = (x * x).sum(1)
    for _ in range(iters):
        c_sq = (centers * centers).sum(1)
        dist = torch.addmm(c_sq[None, :], x, centers.T, alpha=-2.0)  # |x|^2 omitted: same for every centre
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        new = sums / counts.clamp(min=1)[:, None].to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):  # re-seed empty clusters at the worst-served points
            err = dist.gather(1, assign[:, None]).squeeze(1) + x_sq
            worst = err.argsort(descending=True, stable=True)[: len(empty)]
            new[empty[: len(worst)]] = x[worst]
            new[empty[len(worst):]] = centers[empty[len(worst):]]
        if torch.equal(new, centers):
            break
        centers = new
    return centers
