"""`star-scale demo`: the main job end to end on an embedded tiny default.

generated shape images -> offline tokenization into a Zarr store (fits the
small k-means patch tokenizer) -> ST-AR training of the `tiny` preset ->
class-conditional samples decoded to a PNG grid, originals beside their
reconstructions, and a summary.json.  Every step is resumable: re-running
skips what is done.
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

from star_scale.config import load_config
from star_scale.data.store import open_store
from star_scale.demo_data import SHAPES, make_demo_images
from star_scale.models.build import build_model
from star_scale.models.generate import generate
from star_scale.tokenizer import load_tokenizer, psnr, reconstruction_grid
from star_scale.trainer import train

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
    from star_scale.checkpoint import CheckpointDir

    step, state = CheckpointDir(run_dir / "checkpoints").load_latest()
    weights = {k[len("student."):]: v for k, v in state["engine"]["module"].items() if k.startswith("student.")}
    model = build_model(cfg)
    model.load_state_dict(weights)
    return model.eval()


def save_png(array: np.ndarray, path: Path, scale: int = 3) -> None:
    img = Image.fromarray(array)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def sample_grid(model, tokenizer, per_class: int, seed: int = 0, cfg_scale: float = 2.0) -> np.ndarray:
    """Rows = classes, columns = samples; uint8 (H, W, 3) with 2 px gutters."""
    labels = torch.arange(model.args.num_classes).repeat_interleave(per_class)
    codes = generate(model, labels, cfg_scale=cfg_scale, temperature=1.0, top_k=0, top_p=1.0,
                     generator=torch.Generator().manual_seed(seed))
    images = tokenizer.decode(codes).numpy() if torch.is_tensor(codes) else tokenizer.decode(codes)
    images = np.asarray(images)
    n, h, w, _ = images.shape
    pad, rows = 2, model.args.num_classes
    grid = np.full((rows * (h + pad) + pad, per_class * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, per_class)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


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
    grid = sample_grid(model, tokenizer, per_class=8)
    save_png(grid, out / "samples.png")
    originals = np.stack([np.asarray(Image.open(sorted((images / d).iterdir())[0]).convert("RGB"))[2:-2, 2:-2]
                          for d in sorted(p.name for p in images.iterdir())])
    save_png(reconstruction_grid(tokenizer, originals, cols=CLASSES), out / "reconstructions.png")
    result = {
        "images": len(store), "classes": CLASSES, "tokens_per_image": store.tokens_per_image,
        "tokenizer": tokenizer.describe() if hasattr(tokenizer, "describe") else str(tokenizer),
        "tokenizer_psnr_db": round(psnr(originals, np.asarray(tokenizer.decode(tokenizer.encode(originals)))), 2),
        "train": {k: v for k, v in summary.items() if k != "run_dir"},
        "seconds": {"tokenize": round(t_tok - t0, 1), "train": round(t_train - t_tok, 1),
                    "sample": round(time.time() - t_train, 1)},
        "outputs": {"samples": str(out / "samples.png"), "reconstructions": str(out / "reconstructions.png"),
                    "run": str(cfg.run_dir())},
        "class_names": SHAPES[:CLASSES],
    }
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    return result
