"""`star-scale sample`: class-conditional samples at scale, as the ADM evaluator's .npz, plus a PNG grid.

How the work is cut (so results do not depend on the number of ranks):

- all N labels are drawn up front from ``seed`` (or cycle through ``--classes``);
- samples are made in fixed global batches: batch i = indices [i*b, (i+1)*b);
  rank r of W makes batches r, r+W, r+2W, ... (whole batches, never split);
- every sample's randomness is its own: a (T,) vector of uniforms from
  ``numpy.random.default_rng([seed, 1, index])`` drives inverse-CDF sampling at each step;
- each finished batch is written atomically to ``<work>/batch_XXXXXX.npz``
  (tokens, labels, images); a restarted job skips the batches already there,
  so a killed job resumes with the very images it would have made;
- rank 0, once every batch file exists, assembles ``arr_0`` (N, H, W, 3) uint8 and
  ``arr_1`` (N,) labels into the output .npz (atomically) and writes the grid.

``<work>/meta.json`` records the settings; a restart with other settings is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from star_scale.console.progress import progress

from star_scale import atomic
from star_scale.evaluate.adm_npz import write_npz_streaming
from star_scale.models.generate import generate
from star_scale.models.gpt import GPT

log = logging.getLogger(__name__)
Decoder = Callable[[torch.Tensor], "np.ndarray | torch.Tensor"]  # (n, T) codes -> (n, H, W, 3) uint8


@dataclass
class SampleSettings:
    num_samples: int
    batch_size: int = 32
    seed: int = 0
    cfg_scale: float = 1.0
    cfg_interval: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    use_cache: bool = True
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA)
    classes: Optional[list] = None  # labels cycle through these; None: uniform random from seed
    extra: dict = field(default_factory=dict)  # recorded in meta.json (model/tokenizer identity)

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)


# ---- ranks ---------------------------------------------------------------------------
def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun or srun (star_scale.parallel.launch); no process group is needed."""
    from star_scale.parallel.launch import detect

    le = detect()
    return le.rank, le.world_size, le.local_rank


def batches_of_rank(num_batches: int, rank: int, world: int) -> list[int]:
    return list(range(rank, num_batches, world))


# ---- labels and noise ------------------------------------------------------------------
def make_labels(n: int, num_classes: int, seed: int, classes: Optional[list] = None) -> np.ndarray:
    """(n,) int64 labels: ``classes`` repeated to length n, or uniform random from ``seed``."""
    if classes:
        bad = [c for c in classes if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"--classes {bad}: outside 0..{num_classes - 1}")
        return np.resize(np.asarray(classes, dtype=np.int64), n)
    return np.random.default_rng([seed, 0]).integers(0, num_classes, n).astype(np.int64)


def sample_noise(seed: int, indices, n_tokens: int) -> torch.Tensor:
    """(len(indices), T) float32 uniforms in [0, 1): sample i's own stream from (seed, 1, i)."""
    rows = [np.random.default_rng([seed, 1, int(i)]).random(n_tokens, dtype=np.float32) for i in indices]
    return torch.from_numpy(np.stack(rows))


# ---- files ------------------------------------------------------------------------------
def batch_file(work: Path, i: int) -> Path:
    return work / f"batch_{i:06d}.npz"


def check_meta(work: Path, meta: dict) -> None:
    """Write meta.json, or refuse a work folder that holds a run with other settings."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "meta.json"
    meta = json.loads(json.dumps(meta))  # normalise tuples, numpy scalars
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), meta.get(k)) for k in set(old) | set(meta) if old.get(k) != meta.get(k)}
        if diff:
            lines = ", ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{work} holds samples made with other settings ({lines}); "
                             "use another --out/--work-dir or delete that folder")
        return
    atomic.write_text(path, json.dumps(meta, indent=1, sort_keys=True))


def model_fingerprint(model: GPT) -> str:
    """A cheap identity of the weights: sha1 over the first 4096 values of every parameter."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


def save_grid(images, path: str | os.PathLike, nrow: int = 8, pad: int = 2, scale: int = 1) -> Path:
    """Tile (N, H, W, 3) uint8 images into one PNG, ``nrow`` images per row (each pixel ``scale`` x
    ``scale``, for small images), written atomically."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"save_grid expects (N, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    cols = max(1, min(nrow, n))
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic.replacing(path) as f:
        img.save(f, format="PNG")
    return Path(path)


# ---- generation ---------------------------------------------------------------------------
def make_batch(model: GPT, decode: Decoder, labels: np.ndarray, indices, s: SampleSettings, device) -> dict:
    """Tokens, labels and decoded images of one global batch."""
    n_tokens = model.args.grid_size ** 2
    noise = sample_noise(s.seed, indices, n_tokens).to(device)
    y = torch.as_tensor(labels, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    with autocast:
        tokens = generate(model, y, cfg_scale=s.cfg_scale, cfg_interval=s.cfg_interval, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, use_cache=s.use_cache, noise=noise)
    images = decode(tokens.cpu())
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if images.ndim != 4 or images.shape[0] != len(indices) or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"decoder returned {images.dtype} {images.shape}; expected ({len(indices)}, H, W, 3) uint8")
    return {"tokens": tokens.cpu().numpy().astype(np.int32), "labels": labels, "images": images}


def sample_batches(model: GPT, decode: Decoder, work: Path, s: SampleSettings, rank: int = 0, world: int = 1,
                   device=None) -> list[int]:
    """Make this rank's missing batches; returns the batch indices it made."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    labels = make_labels(s.num_samples, model.args.num_classes, s.seed, s.classes)
    mine = [i for i in batches_of_rank(s.num_batches, rank, world) if not batch_file(work, i).exists()]
    made = []
    for i in progress(mine, desc=f"sampling (rank {rank})", unit="batch", disable=rank != 0 and world > 1):
        idx = np.arange(i * s.batch_size, min((i + 1) * s.batch_size, s.num_samples))
        batch = make_batch(model, decode, labels[idx], idx, s, device)
        write_npz_streaming(batch_file(work, i), batch)
        made.append(i)
    log.info("rank %d of %d made %d batches (%d of its %d were already done)", rank, world, len(made),
             len(batches_of_rank(s.num_batches, rank, world)) - len(mine), len(batches_of_rank(s.num_batches, rank, world)))
    return made


def wait_for_batches(work: Path, num_batches: int, timeout: Optional[float] = None, poll: float = 0.5) -> None:
    start, last_report = time.monotonic(), time.monotonic()
    while True:
        missing = [i for i in range(num_batches) if not batch_file(work, i).exists()]
        if not missing:
            return
        now = time.monotonic()
        if timeout is not None and now - start > timeout:
            raise TimeoutError(f"{work}: batches {missing[:10]} (of {len(missing)} missing) never appeared "
                               f"within {timeout:.0f}s; rerun the job to make them")
        if now - last_report > 60:
            log.info("waiting for %d batches from other ranks (e.g. %s)", len(missing), missing[:5])
            last_report = now
        time.sleep(poll)


def assemble(work: Path, out: Path, s: SampleSettings) -> Path:
    """Concatenate the batch files into the ADM .npz: arr_0 images, arr_1 labels (atomic)."""
    with np.load(batch_file(work, 0)) as f:
        shape = f["images"].shape[1:]

    def chunks(key):
        for i in progress(range(s.num_batches), desc=f"assembling {key}", unit="batch", leave=False):
            with np.load(batch_file(work, i)) as f:
                yield f[key]

    write_npz_streaming(out, {"arr_0": ((s.num_samples, *shape), np.uint8, chunks("images")),
                              "arr_1": ((s.num_samples,), np.int64, chunks("labels"))})
    return out


def read_first_images(path: Path, n: int) -> np.ndarray:
    from star_scale.evaluate.adm_npz import iter_npz_batches

    return next(iter_npz_batches(path, "arr_0", batch_size=n))


def sample_to_npz(model: GPT, decode: Decoder, out: str | os.PathLike, settings: SampleSettings, *, rank: int = 0,
                  world: int = 1, device=None, work_dir: Optional[str | os.PathLike] = None, grid: int = 64,
                  grid_nrow: Optional[int] = None, wait_timeout: Optional[float] = None,
                  keep_parts: bool = False) -> Optional[Path]:
    """Sample ``settings.num_samples`` images into ``out`` (ADM .npz); resumable, rank-count invariant.

    Every rank calls this with its rank/world.  Rank 0 waits for all batches, then writes the
    .npz and ``<out>.png`` (the first ``grid`` samples) and returns the .npz path; others return None.
    """
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".parts")
    problem = _invalid(settings)
    if problem:
        raise ValueError(problem)
    meta = {**asdict(settings), "out": out.name}
    meta["extra"] = {"model": model_fingerprint(model), **settings.extra}
    check_meta(work, meta)
    if out.exists() and (work / "assembled").exists():
        log.info("%s is already complete", out)
    else:
        sample_batches(model, decode, work, settings, rank, world, device)
        if rank != 0:
            return None
        wait_for_batches(work, settings.num_batches, wait_timeout)
        assemble(work, out, settings)
        atomic.write_text(work / "assembled", out.name + "\n")
        for stale in work.glob(".batch_*.tmp"):  # left by killed jobs mid-write
            stale.unlink(missing_ok=True)
        if not keep_parts:
            for i in range(settings.num_batches):
                batch_file(work, i).unlink(missing_ok=True)
    if rank != 0:
        return None
    if grid > 0:
        first = read_first_images(out, min(grid, settings.num_samples))
        save_grid(first, out.with_suffix(".png"), grid_nrow or max(1, math.isqrt(len(first))))
    return out


def _invalid(s: SampleSettings) -> Optional[str]:
    if s.num_samples < 1 or s.batch_size < 1:
        return f"--num-samples {s.num_samples} and --batch-size {s.batch_size} must be positive"
    if s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0 or not 0 <= s.cfg_interval <= 1:
        return (f"bad sampling settings: temperature {s.temperature} (>= 0), top_p {s.top_p} (0 < p <= 1), "
                f"top_k {s.top_k} (>= 0), cfg_interval {s.cfg_interval} (0..1)")
    if s.precision not in ("fp32", "bf16"):
        return f"--precision {s.precision!r}: expected fp32 or bf16"
    return None


# ---- command line -------------------------------------------------------------------------
DESCRIPTION = """\
Class-conditional sampling with classifier-free guidance (logits = u + (c - u) * scale, optionally
only for the first --cfg-interval fraction of the steps), temperature, top-k, top-p and a KV cache;
tokens are decoded by the VQ tokenizer and written as the ADM evaluator's .npz (arr_0: N x H x W x 3
uint8, arr_1: labels) plus a PNG grid of the first samples.

Split across ranks: launch with torchrun (--nproc_per_node G) or srun; ranks take whole batches
round-robin and rank 0 assembles the file. Results are identical for any number of ranks: each
sample's randomness comes from (--seed, its index), and batches are fixed global slices.
Resumable: finished batches live in OUT.parts/ (or --work-dir); rerunning the same command
continues where a killed job stopped and gives the same final .npz.

LlamaGen's CFG scales: 2.0 (B, L), 1.75 (XL, XXL), 1.65 (3B); the paper's 50k-sample evaluation:
--num-samples 50000.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-scale sample", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="star-scale model file (exported by training or import-llamagen)")
    p.add_argument("--tokenizer", required=True, help="tokenizer file or name (e.g. vq16) whose decoder makes images")
    p.add_argument("--out", required=True, help="output .npz (ADM format); the grid goes next to it as .png")
    p.add_argument("--num-samples", type=int, default=50000, help="N images (default 50000)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="samples per global batch (default 32); part of the result's identity, like --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale; 1.0 = no guidance (default)")
    p.add_argument("--cfg-interval", type=float, default=1.0, help="fraction of steps (from the first) guided")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at each step (slow; checks)")
    p.add_argument("--classes", help="comma-separated class ids cycled over the samples (default: uniform random)")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16")
    p.add_argument("--device", default="auto", help="auto: this rank's CUDA device when available (per-task binding aware), else cpu")
    p.add_argument("--work-dir", help="folder of finished batches (default: OUT.parts)")
    p.add_argument("--grid", type=int, default=64, help="samples in the PNG grid (0: none)")
    p.add_argument("--keep-parts", action="store_true", help="keep the batch files after assembling")
    p.add_argument("--wait-timeout", type=float, help="seconds rank 0 waits for other ranks' batches (default: forever)")
    return p


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from star_scale.parallel.devices import rank_device_index  # per-task GPU binding aware

        return torch.device("cuda", rank_device_index(local_rank))
    return torch.device(name)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from star_scale.models.model_file import load_model_file
    from star_scale.tokenizer import load_tokenizer

    rank, world, local_rank = dist_env()
    device = _device(args.device, local_rank)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    try:
        model = load_model_file(args.model).to(device).eval()
        tokenizer = load_tokenizer(args.tokenizer, device=str(device))
        if tokenizer.grid_size != model.args.grid_size or tokenizer.codebook_size > model.args.vocab_size:
            raise ValueError(f"tokenizer {args.tokenizer} (grid {tokenizer.grid_size}, {tokenizer.codebook_size} codes) "
                             f"does not fit model {args.model} (grid {model.args.grid_size}, vocab {model.args.vocab_size})")
        classes = [int(c) for c in args.classes.split(",")] if args.classes else None
        settings = SampleSettings(
            num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed, cfg_scale=args.cfg_scale,
            cfg_interval=args.cfg_interval, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            use_cache=not args.no_cache, precision=precision, classes=classes,
            extra={"tokenizer": getattr(tokenizer, "weights_hash", str(args.tokenizer))})
        out = sample_to_npz(model, tokenizer.decode, args.out, settings, rank=rank, world=world, device=device,
                            work_dir=args.work_dir, grid=args.grid, wait_timeout=args.wait_timeout,
                            keep_parts=args.keep_parts)
    except (FileNotFoundError, ValueError, TimeoutError) as e:
        print(f"star-scale sample: error: {e}", file=sys.stderr)
        return 2
    if out is not None:
        print(json.dumps({"npz": str(out), "grid": str(out.with_suffix(".png")) if args.grid else None,
                          "num_samples": settings.num_samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
