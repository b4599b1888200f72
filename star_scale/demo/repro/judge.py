"""repro, step 2: the judge, a small CNN trained on the decoded training tokens."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from star_scale.demo.repro.plan import CENTER_CROP, IMAGE_SIZE, read_split
from star_scale.trust.load import load_torch


# ---- 2. the judge: a small CNN on decoded tokens ---------------------------------------------------
class Judge(nn.Module):
    """4 conv blocks (16-32-64-128 channels) -> global average pool -> 128-d features -> classes."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        blocks = []
        for i in range(4):
            blocks += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i < 3:
                blocks.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*blocks)
        self.feature = nn.Sequential(nn.Linear(chans[-1], chans[-1]), nn.ReLU(inplace=True))
        self.head = nn.Linear(chans[-1], num_classes)

    @staticmethod
    def prepare(images) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
        x = torch.as_tensor(np.asarray(images))
        return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.body(x).mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def judge_outputs(judge: Judge, images, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 128) float64, predicted classes (N,))."""
    judge.eval()
    feats, preds = [], []
    for s in range(0, len(images), batch):
        f = judge.features(Judge.prepare(images[s: s + batch]))
        feats.append(f.double().numpy())
        preds.append(judge.head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def train_judge(train_images: np.ndarray, train_labels: np.ndarray, num_classes: int, epochs: int,
                seed: int = 0, batch: int = 128, lr: float = 2e-3) -> Judge:
    """train_images: (N, crops, H, W, 3) uint8; each epoch sees one random crop of every image."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    judge = Judge(num_classes)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    n, crops = train_images.shape[:2]
    total = max(1, epochs * (n // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    labels = torch.as_tensor(train_labels)
    step = 0
    for _ in range(epochs):
        judge.train()
        order = gen.permutation(n)
        crop = gen.integers(0, crops, n)
        for b in range(n // batch):
            idx = order[b * batch: (b + 1) * batch]
            x = Judge.prepare(train_images[idx, crop[idx]])
            loss = F.cross_entropy(judge(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step < total - 1:
                sched.step()
            step += 1
    return judge.eval()


def balanced_subset(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)])


def load_or_train_judge(out: Path, data: dict, epochs: int, samples_per_class: int) -> tuple[Judge, dict]:
    """The cached judge (trained once per output folder) and its reference numbers."""
    from star_scale.data.store import open_store
    from star_scale.evaluate.metrics import fid_from_features
    from star_scale.tokenizer import load_tokenizer

    path = out / "classifier.pt"
    k = data["classes"]
    if path.is_file():
        saved = load_torch(path)
        if saved["info"].get("epochs") == epochs and saved["info"].get("reference_images") == k * samples_per_class:
            judge = Judge(k)
            judge.load_state_dict(saved["state_dict"])
            return judge.eval(), saved["info"]
    t0 = time.time()
    tok = load_tokenizer(data["tokenizer"])
    train_codes, train_labels = read_split(open_store(data["train"]), crop=None)
    n, crops, t = train_codes.shape
    train_images = np.asarray(tok.decode(train_codes.reshape(n * crops, t))).reshape(n, crops, IMAGE_SIZE, IMAGE_SIZE, 3)
    judge = train_judge(train_images, train_labels, k, epochs)
    val_images, val_labels = decoded_val(data)
    val_feats, val_pred = judge_outputs(judge, val_images)
    sub = balanced_subset(train_labels, samples_per_class, k)
    train_feats, _ = judge_outputs(judge, train_images[sub, CENTER_CROP])
    info = {
        "val_accuracy": float((val_pred == val_labels).mean()),
        # The floor of the FID column: as many real (reconstructed) training images as samples, vs val.
        "fid_real_train_vs_val": float(fid_from_features(train_feats, val_feats)),  # plain floats: weights_only
        "reference_images": int(len(sub)),
        "epochs": epochs, "trained_on": f"{n} images x {crops} decoded crops", "seconds": round(time.time() - t0, 1),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": judge.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)
    return judge, info


def decoded_val(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """The validation images as the generator can produce them: centre-crop tokens decoded."""
    from star_scale.data.store import open_store
    from star_scale.tokenizer import load_tokenizer

    codes, labels = read_split(open_store(data["val"]))
    return np.asarray(load_tokenizer(data["tokenizer"]).decode(codes)), labels
