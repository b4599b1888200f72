"""``star-scale bench data``: the training loader against raw sequential reads of the same store.

Builds (or opens, with ``--store``) a token store, then measures in one run

* the tokenizer's encode rate (``--tokenizer``, else a patch tokenizer fitted
  on generated shapes): crops/s and images/s (ten crops an image);
* raw sequential reads of the store, the fastest of two plain readers: whole
  shards through zarr, and every chunk in order through the store's direct
  chunk reader (no shuffling, no batching, no copies);
* the loader (``TokenLoader``, one rank): one full epoch of shuffled batches of
  ``--views`` views, int64 tensors, background prefetch; timed from
  construction to the last batch.

Measurements alternate (raw, loader, raw, loader ...) and the best of
``--repeats`` each is kept, so a noisy neighbour hurts both alike.  The last
two lines are ``samples/s = N`` (the loader) and ``ratio loader/raw = X``.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_synthetic_store(path: Path, rows: int, tokens: int, codebook: int = 16384, classes: int = 1000,
                          shard_size: int | None = None, chunk_size: int | None = None, seed: int = 0) -> float:
    """Random codes (as incompressible as real VQ codes) in the tokenize job's layout; returns seconds taken."""
    from star_scale.data import schema

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    shard, chunk = schema.default_chunking(rows, 10, tokens, shard_size, chunk_size)
    g = schema.create_token_group(path, rows, 10, tokens, shard_size=shard, chunk_size=chunk,
                                  attrs={"num_classes": classes, "synthetic": True, "tokens_per_image": tokens})
    for s in range(0, rows, shard):
        e = min(rows, s + shard)
        g[schema.CODES][s:e] = rng.integers(0, codebook, (e - s, 10, tokens), dtype=np.uint16)
    g[schema.LABELS][:] = rng.integers(0, classes, rows, dtype=np.int32)
    return time.perf_counter() - t0


def _rates(n: int, t0: float, c0: float) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of the whole process)."""
    return n / (time.perf_counter() - t0), n / max(1e-9, time.process_time() - c0)


def raw_zarr_shards(store) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    n = len(store)
    for s in range(0, n, store.shard_size):
        store.codes[s: min(n, s + store.shard_size)]
        store.labels[s: min(n, s + store.shard_size)]
    return _rates(n, t0, c0)


def raw_chunks(store) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for c in range(-(-len(store) // store.chunk_size)):
        store.read_chunk(c)
    return _rates(len(store), t0, c0)


def loader_rate(store, batch_size: int, views: int, buffer_chunks: int, prefetch: int, seed: int,
                epoch: int) -> tuple[float, float]:
    from star_scale.data import TokenLoader

    t0, c0 = time.perf_counter(), time.process_time()
    loader = TokenLoader(store, batch_size, views=views, seed=seed, buffer_chunks=buffer_chunks, prefetch=prefetch)
    loader.load_state_dict({"epoch": epoch, "batch_in_epoch": 0})
    n = loader.batches_per_epoch(epoch)
    it = iter(loader)
    total = 0
    for _ in range(n):
        b = next(it)
        total += b.tokens.shape[0]
    rates = _rates(total, t0, c0)
    loader.close()
    return rates


def tokenizer_rate(path: str | None, n_images: int, seconds: float = 2.0, device: str = "cpu") -> tuple[str, float, float]:
    from star_scale.tokenizer import PatchTokenizer, load_tokenizer

    if path:
        tok = load_tokenizer(path, device=device)
    else:
        from star_scale.demo.data import SHAPES, draw_shape

        rng = np.random.default_rng(0)
        imgs = np.stack([np.asarray(draw_shape(SHAPES[i % len(SHAPES)], 32, rng)) for i in range(256)])
        tok = PatchTokenizer.fit(imgs, codebook_size=512, seed=0, iters=10)
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (min(n_images, 4096 if tok.image_size <= 64 else 256), tok.image_size, tok.image_size, 3),
                         dtype=np.uint8)
    tok.encode(crops[:16])  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        tok.encode(crops)
        done += len(crops)
    rate = done / (time.perf_counter() - t0)
    return tok.name, rate, rate / 10


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="star-scale bench data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--store", default=None, help="token store to read (default: build a synthetic one in a temp folder)")
    p.add_argument("--rows", type=int, default=65536, help="rows of the synthetic store")
    p.add_argument("--tokens", type=int, default=256, help="tokens per crop of the synthetic store (256 = VQ-16 at 256 px)")
    p.add_argument("--chunk-size", type=int, default=None, help="synthetic store's chunk rows (default: the tokenize job's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--views", type=int, default=2, help="views per sample (2: ST-AR, 1: plain AR)")
    p.add_argument("--buffer-chunks", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating measurements of each; the best counts")
    p.add_argument("--tokenizer", default=None, help="tokenizer file to time (default: a fitted patch tokenizer)")
    p.add_argument("--tokenizer-images", type=int, default=2048)
    p.add_argument("--device", default="cpu", help="device for the tokenizer measurement")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer measurement")
    p.add_argument("--check", action="store_true", help="exit 1 unless loader >= 0.8x raw and >= 40k samples/s")
    args = p.parse_args(argv)

    from star_scale.data import open_store

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.no_tokenizer:
        name, crops_s, images_s = tokenizer_rate(args.tokenizer, args.tokenizer_images, device=args.device)
        print(f"tokenizer {name}: {crops_s:,.0f} crops/s = {images_s:,.0f} images/s "
              f"(encode only, ten crops an image, {torch.get_num_threads()} threads)")
    tmp = None
    try:
        if args.store:
            path = Path(args.store)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="star-bench-data-"))
            path = tmp / "bench.zarr"
            dt = build_synthetic_store(path, args.rows, args.tokens, chunk_size=args.chunk_size)
            print(f"built synthetic store in {dt:.1f}s")
        store = open_store(path)
        n, crops, t = len(store), store.crops, store.tokens_per_image
        on_disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0
        print(f"store {path}: {n} rows x {crops} crops x {t} tokens uint16 ({n * crops * t * 2 / 2**20:.0f} MiB, "
              f"{on_disk / 2**20:.0f} MiB on disk), shards of {getattr(store, 'shard_size', '-')}, chunks of {store.chunk_size}"
              f"{'' if getattr(store, '_direct', None) is not None else ' (zarr reads)'}")
        raw_chunks(store)  # warm the page cache and the shard-index cache
        raw_z, raw_c, loader = [], [], []
        for r in range(max(1, args.repeats)):
            if hasattr(store, "shard_size"):
                raw_z.append(raw_zarr_shards(store))
            raw_c.append(raw_chunks(store))
            loader.append(loader_rate(store, args.batch_size, args.views, args.buffer_chunks, args.prefetch, 0, r))
        raw = max(w for w, _ in raw_z + raw_c)
        raw_cpu = max(c for _, c in raw_z + raw_c)
        if raw_z:
            print(f"raw sequential whole-shard reads (zarr): {max(w for w, _ in raw_z):,.0f} samples/s")
        print(f"raw sequential chunk reads (direct):     {max(w for w, _ in raw_c):,.0f} samples/s")
        print(f"loader: batch {args.batch_size}, {args.views} views, buffer {args.buffer_chunks} chunks, prefetch "
              f"{args.prefetch}; runs {', '.join(f'{w:,.0f}' for w, _ in loader)} samples/s")
        best = max(w for w, _ in loader)
        best_cpu = max(c for _, c in loader)
        print(f"per CPU-second of this process (robust on a busy machine): raw {raw_cpu:,.0f}, loader {best_cpu:,.0f}, "
              f"ratio {best_cpu / raw_cpu:.3f}")
        ok = best >= 0.8 * raw and best >= 40_000
        if args.check and not ok:
            print("CHECK FAILED: targets are loader >= 0.8x raw and >= 40k samples/s")
        print(f"samples/s = {best:.0f}")
        print(f"ratio loader/raw = {best / raw:.3f}")
        return 1 if args.check and not ok else 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
