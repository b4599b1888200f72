"""Linear probing, ST-AR's "understanding" metric: a linear classifier on frozen GPT features.

Features (the paper's protocol; the positions are [inferred]): run the GPT on an image's
T tokens with the null class as the class token, take the hidden states of one layer
(default: the middle, depth / 2) at ``steps`` uniformly spaced steps and average them.
Step j (j = 1..steps) is the sequence position after round(j * T / steps) image tokens,
so the last one has seen the whole image: for T = 256 and 8 steps, positions 32, 64, ..., 256.

Classifier (MAE's linear-probe protocol): BatchNorm1d without affine (eps 1e-6) + Linear
(weights ~ N(0, 0.01), bias 0), cross-entropy, LARS (momentum 0.9, trust 0.001, no weight
decay), lr = blr * batch / 256 with blr 0.1, batch 16384, 90 epochs, 10 warm-up epochs then
cosine decay.  Those settings assume ImageNet-sized sets; for small sets (the demo, live
metrics during training) ``optimizer="sgd"`` converges in a few epochs.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from star_scale.console.progress import progress as progress_bar
from star_scale import atomic

log = logging.getLogger(__name__)


# ---- features ----------------------------------------------------------------------------
def probe_positions(n_tokens: int, steps: int = 8) -> list[int]:
    """Sequence positions (1..T) of ``steps`` uniformly spaced steps, the last at T."""
    if not 1 <= steps <= n_tokens:
        raise ValueError(f"steps={steps}: expected 1..{n_tokens} (the image's token count)")
    return [round(j * n_tokens / steps) for j in range(1, steps + 1)]


@torch.no_grad()
def extract_features(model, tokens, layer: int, steps: int = 8, batch_size: int = 64, device=None,
                     precision: str = "auto", progress: bool = False) -> torch.Tensor:
    """(N, T) image tokens -> (N, width) float32 CPU features of ``layer``, null class, averaged over steps."""
    tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens).long()
    a = model.args
    n_tokens = a.grid_size ** 2
    if tokens.ndim != 2 or tokens.shape[1] != n_tokens:
        raise ValueError(f"expected tokens (N, {n_tokens}) for grid {a.grid_size}, got {tuple(tokens.shape)}")
    if not 1 <= layer <= a.layers:
        raise ValueError(f"layer={layer}: expected 1..{a.layers}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    pos = torch.tensor(probe_positions(n_tokens, steps), device=device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in progress_bar(range(0, len(tokens), batch_size), desc="probe features", unit="batch",
                          disable=not progress, leave=False):
            x = tokens[s: s + batch_size].to(device)
            null = torch.full((len(x),), a.num_classes, dtype=torch.long, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                h = model(x, null, return_layers=(layer,), logits=False).hidden[layer]
            out.append(h[:, pos].float().mean(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# ---- classifier ----------------------------------------------------------------------------
class LinearProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.norm(x))


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's linear probe: trust-ratio scaling and weight decay only on >= 2-dim parameters."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0, torch.where(un > 0, g["trust_coefficient"] * pn / un, one), one)
                    dp = dp.mul(q)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def _lr_at(progress: float, base: float, warmup: float) -> float:
    """Linear warm-up for the first ``warmup`` fraction, then half-cosine to 0 (MAE's schedule)."""
    if progress < warmup:
        return base * progress / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / max(1e-8, 1 - warmup)))


def train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int = 90, batch_size: int = 16384,
                blr: float = 0.1, optimizer: str = "lars", warmup_epochs: float = 10, weight_decay: float = 0.0,
                seed: int = 0, device="cpu", progress: bool = False) -> LinearProbe:
    """Fit BatchNorm(affine=False) + Linear on (N, D) features and (N,) labels; lr = blr * batch / 256."""
    x = torch.as_tensor(x, dtype=torch.float32).to(device)
    y = torch.as_tensor(y, dtype=torch.long).to(device)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need at least 2 features with one label each, got {len(x)} features and {len(y)} labels")
    torch.manual_seed(seed)
    probe = LinearProbe(x.shape[1], num_classes).to(device)
    batch_size = min(batch_size, len(x))
    lr = blr * batch_size / 256
    if optimizer == "lars":
        opt = LARS(probe.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer={optimizer!r}: expected 'lars' or 'sgd'")
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, len(x) // batch_size)  # drop the last partial batch (BatchNorm needs > 1 row)
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs / max(epochs, 1), 0.99)
    probe.train()
    step = 0
    for _ in progress_bar(range(epochs), desc="linear probe", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(x), generator=gen).to(device)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size: (b + 1) * batch_size]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step / total, lr, warmup)
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return probe.eval()


@torch.no_grad()
def probe_top1(probe: LinearProbe, x, y, batch_size: int = 8192) -> float:
    device = probe.head.weight.device
    x = torch.as_tensor(x, dtype=torch.float32)
    y = _labels(y)
    correct = sum(int((probe(x[s: s + batch_size].to(device)).argmax(1).cpu() == y[s: s + batch_size]).sum())
                  for s in range(0, len(x), batch_size))
    return correct / max(1, len(x))


def _labels(y) -> torch.Tensor:
    return (y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))).long().cpu()


def linear_probe(train_x, train_y, val_x, val_y, num_classes: Optional[int] = None, **train_kw) -> float:
    """Top-1 accuracy (0..1) on the validation features of a probe trained on the training features."""
    train_y, val_y = _labels(train_y), _labels(val_y)
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    probe = train_probe(train_x, train_y, num_classes, **train_kw)
    return probe_top1(probe, val_x, val_y)


def probe_accuracy(model, train_tokens, train_labels, val_tokens, val_labels, layer: Optional[int] = None,
                   steps: int = 8, *, epochs: int = 20, batch_size: int = 256, blr: float = 0.1,
                   optimizer: str = "sgd", warmup_epochs: float = 2, seed: int = 0, feature_batch: int = 64,
                   device=None) -> float:
    """Linear-probe top-1 accuracy (0..1) of a GPT's features: the trainer's live "understanding" metric.

    model: the (unwrapped) GPT; its train/eval mode is restored.  *_tokens: (N, T) image tokens,
    *_labels: (N,) classes.  layer: default depth / 2.  The defaults are quick (SGD, 20 epochs);
    pass the MAE settings (optimizer="lars", batch_size=16384, epochs=90, warmup_epochs=10) for the
    paper's protocol.
    """
    layer = layer or max(1, model.args.layers // 2)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    kw = dict(layer=layer, steps=steps, batch_size=feature_batch, device=device)
    train_x = extract_features(model, train_tokens, **kw)
    val_x = extract_features(model, val_tokens, **kw)
    return linear_probe(train_x, train_labels, val_x, val_labels, num_classes=model.args.num_classes,
                        epochs=epochs, batch_size=batch_size, blr=blr, optimizer=optimizer,
                        warmup_epochs=warmup_epochs, seed=seed, device=device)


# ---- command line ----------------------------------------------------------------------------
def read_tokens(path, crop: int = 0, limit: Optional[int] = None):
    """(N, T) tokens of one crop and (N,) labels from a token store (.zarr or .npz)."""
    from star_scale.data.store import open_store

    store = open_store(path)
    if not 0 <= crop < store.crops:
        raise ValueError(f"--crop {crop}: {path} holds {store.crops} crops per image")
    n = len(store) if limit is None else min(limit, len(store))
    step = max(1, getattr(store, "chunk_size", 4096))
    codes, labels = [], []
    for s in range(0, n, step):
        c, y = store.read(s, min(n, s + step))
        codes.append(np.asarray(c)[:, crop].astype(np.int64))
        labels.append(np.asarray(y).astype(np.int64))
    return np.concatenate(codes), np.concatenate(labels)


DESCRIPTION = __doc__.split("\n\n", 1)[1] + """
Validation: --val-data (e.g. the ImageNet val tokens), else a held-out --val-fraction of --data.
Prints {"top1": ..., ...} as JSON."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-scale probe", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="star-scale model file")
    p.add_argument("--data", required=True, help="token store (.zarr or .npz) with the training images")
    p.add_argument("--val-data", help="token store with the validation images")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out of --data without --val-data (0.1)")
    p.add_argument("--layer", type=int, help="block whose output is probed (1..depth; default depth / 2)")
    p.add_argument("--steps", type=int, default=8, help="uniformly spaced steps averaged (default 8)")
    p.add_argument("--crop", type=int, default=0, help="which of the stored crops of each image to use (default 0)")
    p.add_argument("--max-train", type=int, help="use at most this many training images")
    p.add_argument("--max-val", type=int, help="use at most this many validation images")
    p.add_argument("--optimizer", choices=["lars", "sgd"], default="lars", help="lars (MAE) or sgd (small sets)")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=16384)
    p.add_argument("--blr", type=float, default=0.1, help="base lr; lr = blr * batch / 256")
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--feature-batch", type=int, default=64, help="sequences per GPT forward")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the result as JSON here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from star_scale.models.model_file import load_model_file

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        model = load_model_file(args.model).to(device)
        layer = args.layer or max(1, model.args.layers // 2)
        tokens, labels = read_tokens(args.data, args.crop)
        if args.val_data:
            val_tokens, val_labels = read_tokens(args.val_data, args.crop, args.max_val)
        else:
            order = np.random.default_rng(args.seed).permutation(len(tokens))
            n_val = max(1, int(round(args.val_fraction * len(tokens))))
            val_idx, train_idx = order[:n_val][: args.max_val], order[n_val:]
            val_tokens, val_labels = tokens[val_idx], labels[val_idx]
            tokens, labels = tokens[train_idx], labels[train_idx]
        tokens, labels = tokens[: args.max_train], labels[: args.max_train]
        if args.optimizer == "lars" and len(tokens) < args.batch_size:
            log.warning("%d training images < batch %d: MAE's LARS settings assume ImageNet scale; "
                        "consider --optimizer sgd --batch-size 256", len(tokens), args.batch_size)
        kw = dict(layer=layer, steps=args.steps, batch_size=args.feature_batch, device=device, progress=True)
        train_x, val_x = extract_features(model, tokens, **kw), extract_features(model, val_tokens, **kw)
        top1 = linear_probe(train_x, labels, val_x, val_labels, num_classes=model.args.num_classes,
                            epochs=args.epochs, batch_size=args.batch_size, blr=args.blr, optimizer=args.optimizer,
                            warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, seed=args.seed,
                            device=device, progress=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"star-scale probe: error: {e}", file=sys.stderr)
        return 2
    result = {"top1": top1, "layer": layer, "steps": args.steps, "train": len(tokens), "val": len(val_tokens),
              "optimizer": args.optimizer, "epochs": args.epochs}
    text = json.dumps(result)
    print(text)
    if args.out:
        atomic.write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
