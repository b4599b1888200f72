"""repro, step 1: the grid of (config, seed) runs, their names, and the tokenized data."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

CONFIGS = ["baseline", "ar_2view", "mim", "mim_step", "mim_view", "all"]
TITLES = {"baseline": "baseline (AR)", "ar_2view": "AR on 2 views (control)", "mim": "+MIM", "mim_step": "+MIM+step", "mim_view": "+MIM+view",
          "all": "+MIM+step+view (ST-AR)"}
# Table 3 of the paper (GPT-B, ImageNet 256, 50 epochs): FID without CFG, linear-probe top-1 %.
PAPER = {"baseline": (31.35, 18.68), "mim": (30.58, 22.71), "mim_step": (28.02, 27.73),
         "mim_view": (27.78, 38.31), "all": (26.58, 45.27)}
CENTER_CROP = 4  # tokenize_data's ten crops: tl, tr, bl, br, centre, then the flipped five
IMAGE_SIZE = 32
SETTINGS_FILE = "settings.json"
RESULT_FILE = "result.json"
# Settings that change the numbers: a folder with results made under other values is refused.
RESULT_KEYS = ("dataset", "per_class", "val_per_class", "seeds_data", "palette", "clutter", "classifier_epochs",
               "samples_per_class", "cfg_scale", "sample_seed", "probe_epochs", "overrides", "recipes_sha")
# Config overrides a dataset needs beyond recipes/repro (written for the 8 shape classes).
DATASET_OVERRIDES = {"shapes": [], "digits": ["model.num_classes=10"]}


def default_recipes() -> Path:
    return Path(__file__).resolve().parents[3] / "recipes" / "repro"


# ---- small helpers ---------------------------------------------------------------------------
def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_name(config: str, seed: int) -> str:
    return f"{config}-s{seed}"


def grid(configs: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Task order: seed-major, so an interrupted hour leaves complete seeds of every config."""
    return [(c, s) for s in seeds for c in configs]


def read_split(store, crop: Optional[int] = CENTER_CROP) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) codes of one crop (or (N, crops, T) for crop=None) and (N,) labels of the valid rows."""
    codes, labels = store.read(0, len(store))
    codes, labels = np.asarray(codes).astype(np.int64), np.asarray(labels).astype(np.int64)
    keep = labels >= 0
    codes, labels = codes[keep], labels[keep]
    return (codes if crop is None else codes[:, crop]), labels


# ---- 1. data -----------------------------------------------------------------------------------
def digit_split(split: str, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of the real digits of one split (a fixed stratified 80/20), at most per_class per class."""
    from star_scale.demo.digits import load_digit_arrays, split as split_digits

    _, labels = load_digit_arrays()
    idx = split_digits(labels, seed=seed)[0 if split == "train" else 1]
    return np.concatenate([idx[labels[idx] == c][:per_class] for c in np.unique(labels)])


def make_split_images(folder: Path, dataset: str, split: str, per_class: int, seed: int,
                      palette: Optional[int], clutter: int) -> Path:
    if dataset == "digits":
        from star_scale.demo.digits import make_digit_images
        return make_digit_images(folder, digit_split(split, per_class), size=IMAGE_SIZE)
    from star_scale.demo.data import SHAPES, make_demo_images
    return make_demo_images(folder, classes=len(SHAPES), per_class=per_class, size=IMAGE_SIZE + 4, seed=seed,
                            palette=palette, clutter=clutter)


def prepare_data(out: Path, per_class: int, val_per_class: int, seeds_data: tuple[int, int] = (0, 1),
                 palette: Optional[int] = None, clutter: int = 3, dataset: str = "shapes") -> dict:
    """Train/val image folders (generated shapes, or the real digits split 80/20) -> two token
    stores sharing one fitted tokenizer."""
    from star_scale.data.store import open_store

    data = out / "data"
    paths = {"train": data / "train.zarr", "val": data / "val.zarr"}
    for split, n, seed in (("train", per_class, seeds_data[0]), ("val", val_per_class, seeds_data[1])):
        images = make_split_images(data / f"{split}_images", dataset, split, n, seed, palette, clutter)
        tokenizer = "patch-kmeans" if split == "train" else str(open_store(paths["train"]).tokenizer_path)
        cmd = [sys.executable, "-m", "tokenize_data", str(images), str(paths[split]), "--tokenizer", tokenizer,
               "--image-size", str(IMAGE_SIZE), "--shard-size", "1024", "--chunk-size", "128", "--no-progress"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # resumable: done shards are skipped
    train, val = open_store(paths["train"]), open_store(paths["val"])
    if str(train.attrs["tokenizer"]["weights_hash"]) != str(val.attrs["tokenizer"]["weights_hash"]):
        raise RuntimeError(f"{paths['val']} was tokenized with another tokenizer than {paths['train']}; delete it")
    return {"train": str(paths["train"]), "val": str(paths["val"]), "tokenizer": str(train.tokenizer_path),
            "train_images": len(train), "val_images": len(val), "classes": int(train.attrs["num_classes"]),
            "class_names": list(train.attrs["class_names"])}
