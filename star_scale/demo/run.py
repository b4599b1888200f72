"""`star-scale demo`: the main job end to end on an embedded tiny default.

generated shape images -> offline tokenization into a Zarr store (fits the
small k-means patch tokenizer) -> ST-AR training of the `tiny` preset ->
class-conditional samples decoded to a PNG grid, originals beside their
reconstructions, a linear-probe accuracy of the middle layer, the metrics
computable without Inception weights (FID, precision and recall on
downsampled pixels), and a summary.json.  Every step is resumable:
re-running skips what is done.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from star_scale import atomic
from star_scale.config import load_config
from star_scale.data.store import open_store
from star_scale.demo.data import SHAPES, make_demo_images
from star_scale.evaluate.metrics import fid_from_features, precision_recall
from star_scale.evaluate.probe import probe_accuracy, read_tokens
from star_scale.evaluate.sample import save_grid
from star_scale.models.build import build_model
from star_scale.models.generate import generate
from star_scale.tokenizer import load_tokenizer, psnr, reconstruction_grid
from star_scale.train.loop import train

log = logging.getLogger(__name__)

CLASSES, PER_CLASS, IMAGE_SIZE = 8, 128, 32
# The embedded default: the tiny preset with ST-AR on the demo's tokens.
DEMO_OVERRIDES = [
    "name=demo", "model.preset=tiny", "model.vocab_size=512", f"model.num_classes={CLASSES}", "model.grid_size=8",
    "objective.name=star", "objective.ema_decay=0.99", "data.global_batch=32",
    "optimizer.lr=1e-3", "optimizer.lr_batch=null", "train.log_every=50", "train.ckpt_every=200",
]
DEFAULT_STEPS = 600


def tokenize(images: Path, store: Path) -> None:
    """Run the offline job as a user would (its own program); resumes if interrupted."""
    cmd = [sys.executable, "-m", "tokenize_data", str(images), str(store), "--tokenizer", "patch-kmeans",
           "--image-size", str(IMAGE_SIZE), "--shard-size", "256", "--no-progress"]
    subprocess.run(cmd, check=True)


def student_from_checkpoint(cfg, run_dir: Path) -> torch.nn.Module:
    from star_scale.train.checkpoint import CheckpointDir

    step, state = CheckpointDir(run_dir / "checkpoints").load_latest()
    weights = {k[len("student."):]: v for k, v in state["engine"]["module"].items() if k.startswith("student.")}
    model = build_model(cfg)
    model.load_state_dict(weights)
    return model.eval()


def sample_images(model, tokenizer, per_class: int, seed: int = 0, cfg_scale: float = 2.0) -> np.ndarray:
    """(classes * per_class, H, W, 3) uint8 samples, class-major."""
    labels = torch.arange(model.args.num_classes).repeat_interleave(per_class)
    codes = generate(model, labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(seed))
    return np.asarray(tokenizer.decode(codes))


def pixel_features(images: np.ndarray, side: int = 8) -> np.ndarray:
    """Images averaged down to side x side x 3 in [0, 1]: a feature space needing no downloaded weights."""
    n, h, w, _ = images.shape
    x = images.reshape(n, side, h // side, side, w // side, 3).mean(axis=(2, 4))
    return x.reshape(n, -1).astype(np.float64) / 255.0


def demo_probe(cfg, model, store_path: Path) -> float:
    """Linear-probe accuracy of the middle layer: first 80% of the images to fit, the rest to score."""
    tokens, labels = read_tokens(store_path, crop=0)
    split = int(0.8 * len(labels))
    return probe_accuracy(model, tokens[:split], labels[:split], tokens[split:], labels[split:],
                          layer=cfg.contrastive_layer())


def run_demo(out: str | Path = "demo_out", steps: Optional[int] = None, per_class: int = PER_CLASS) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images = make_demo_images(out / "images", classes=CLASSES, per_class=per_class, size=IMAGE_SIZE + 4)
    store_path = out / "tokens.zarr"
    tokenize(images, store_path)
    store = open_store(store_path)
    tokenizer = load_tokenizer(store.tokenizer_path)
    t_tok = time.time()

    cfg = load_config(None, DEMO_OVERRIDES + [f"data.path={store_path}", f"train.out_dir={out / 'run'}",
                                              f"train.steps={steps or DEFAULT_STEPS}"])
    summary = train(cfg)
    t_train = time.time()

    model = student_from_checkpoint(cfg, cfg.run_dir())
    samples = sample_images(model, tokenizer, per_class=32)
    save_grid(samples.reshape(CLASSES, 32, *samples.shape[1:])[:, :8].reshape(-1, *samples.shape[1:]),
              out / "samples.png", nrow=8, scale=3)
    originals = np.stack([np.asarray(Image.open(p).convert("RGB"))[2:-2, 2:-2]
                          for p in sorted(images.glob("*/*.png"))])
    save_grid(reconstruction_grid(tokenizer, originals[::per_class], cols=CLASSES)[None],
              out / "reconstructions.png", nrow=1, pad=0, scale=3)
    real, fake = pixel_features(originals), pixel_features(samples)
    precision, recall = precision_recall(real, fake, half=False)
    metrics = {"probe_top1": demo_probe(cfg, model, store_path),
               "pixel_fid": fid_from_features(fake, real), "pixel_precision": precision, "pixel_recall": recall}
    result = {
        "images": len(store), "classes": CLASSES, "tokens_per_image": store.tokens_per_image,
        "tokenizer": tokenizer.describe() if hasattr(tokenizer, "describe") else str(tokenizer),
        "tokenizer_psnr_db": round(psnr(originals, np.asarray(tokenizer.decode(tokenizer.encode(originals)))), 2),
        # Pixel-space metrics on 8x8 averages: a sanity check, not comparable to Inception FID.
        "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "train": {k: v for k, v in summary.items() if k != "run_dir"},
        "seconds": {"tokenize": round(t_tok - t0, 1), "train": round(t_train - t_tok, 1),
                    "sample": round(time.time() - t_train, 1)},
        "outputs": {"samples": str(out / "samples.png"), "reconstructions": str(out / "reconstructions.png"),
                    "run": str(cfg.run_dir())},
        "class_names": SHAPES[:CLASSES],
    }
    atomic.write_text(out / "summary.json", json.dumps(result, indent=1, default=str))
    return result
