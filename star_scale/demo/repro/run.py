"""`star-scale repro`: the paper's loss ablation (Table 3) at a scale that runs on a CPU in under an hour.

One command, every stage resumable (re-running skips what is done):

1. data: the generated shape set (``demo_data``: 8 classes, position / scale /
   rotation / colour vary within a class; colours from an 8-colour palette by
   default), a training folder and a held-out
   validation folder drawn with another seed, both tokenized by the offline
   job (``tokenize_data``): patch-kmeans fitted on the training images, the
   validation images encoded with that same tokenizer file.
2. judge: a small CNN trained once on the decoded training tokens (all ten
   crops), cached in ``OUT/classifier.pt``; it scores generated samples
   (class accuracy) and its penultimate features give an FID against the
   decoded validation images.
3. runs: every recipe of ``recipes/repro/`` (baseline, +MIM, +MIM+step,
   +MIM+view, all three, and a control: the baseline's loss on both views,
   i.e. ST-AR's sequences per step) for every seed, each in its own process
   (``--jobs`` at a time), each written to ``OUT/runs/<config>-s<seed>/``
   and finished by ``result.json``; a run with a result is skipped, an
   interrupted run resumes from its last checkpoint.
4. table: mean +- sample std over seeds per config, and the paired difference
   to the baseline of the same seed, printed and written to ``OUT/table.md``
   with every run's numbers in ``OUT/results.json``.

Per run (all on the validation split): linear-probe top-1 of the middle layer
(null class, hidden states averaged over 8 uniformly spaced steps,
BatchNorm(affine=False) + linear head, ``star_scale.probe``), next-token loss
(nats per token, centre crop, true labels), and generation quality: N samples
per class with fixed per-sample noise (identical for every model), without
CFG and with ``--cfg-scale``, scored by the judge's accuracy and by the FID of
its features against the validation reconstructions.

Slurm: ``star-scale repro --prepare-only`` once, then an array job with one
task per run (``star-scale repro --task $SLURM_ARRAY_TASK_ID``, ``--list``
prints the task -> run mapping), then ``star-scale repro`` prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
RESULT_KEYS = ("per_class", "val_per_class", "seeds_data", "palette", "clutter", "classifier_epochs",
               "samples_per_class", "cfg_scale", "sample_seed", "probe_epochs", "overrides", "recipes_sha")


def default_recipes() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes" / "repro"


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
def prepare_data(out: Path, per_class: int, val_per_class: int, seeds_data: tuple[int, int] = (0, 1),
                 palette: Optional[int] = None, clutter: int = 3) -> dict:
    """Generated train/val image folders -> two token stores sharing one fitted tokenizer."""
    from star_scale.data.store import open_store
    from star_scale.demo_data import SHAPES, make_demo_images

    data = out / "data"
    paths = {"train": data / "train.zarr", "val": data / "val.zarr"}
    for split, n, seed in (("train", per_class, seeds_data[0]), ("val", val_per_class, seeds_data[1])):
        images = make_demo_images(data / f"{split}_images", classes=len(SHAPES), per_class=n,
                                  size=IMAGE_SIZE + 4, seed=seed, palette=palette, clutter=clutter)
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
        saved = torch.load(path, map_location="cpu", weights_only=False)
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
        "fid_real_train_vs_val": fid_from_features(train_feats, val_feats),
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


# ---- 3. one run --------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(model, codes: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    from star_scale.objectives.ar import next_token_loss

    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(codes), batch):
        seq = torch.as_tensor(codes[s: s + batch])
        lab = torch.as_tensor(labels[s: s + batch])
        loss = next_token_loss(model(seq[:, :-1], lab).logits, seq)
        total += float(loss) * seq.numel()
        count += seq.numel()
    return total / count


@torch.no_grad()
def sample_images(model, tokenizer, num_classes: int, per_class: int, cfg_scale: float, seed: int,
                  batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """per_class samples of every class, uint8 (N, H, W, 3), with the same per-sample noise for every model."""
    from star_scale.models.generate import generate

    labels = torch.arange(num_classes).repeat_interleave(per_class)
    t = model.args.grid_size ** 2
    noise = torch.rand(len(labels), t, generator=torch.Generator().manual_seed(seed))
    codes = [generate(model, labels[s: s + batch], cfg_scale=cfg_scale, temperature=1.0, top_k=0, top_p=1.0,
                      noise=noise[s: s + batch]) for s in range(0, len(labels), batch)]
    return np.asarray(tokenizer.decode(torch.cat(codes))), labels.numpy()


def evaluate_run(model, data: dict, judge: Judge, settings: dict, layer: int) -> dict:
    from star_scale.data.store import open_store
    from star_scale.evaluate.metrics import fid_from_features
    from star_scale.probe import probe_accuracy
    from star_scale.tokenizer import load_tokenizer

    t0 = time.time()
    train_codes, train_labels = read_split(open_store(data["train"]))
    val_codes, val_labels = read_split(open_store(data["val"]))
    k = data["classes"]
    result = {"val_loss": validation_loss(model, val_codes, val_labels)}
    result["probe_top1"] = probe_accuracy(model, train_codes, train_labels, val_codes, val_labels, layer=layer,
                                          steps=8, epochs=settings["probe_epochs"], seed=0, device="cpu")
    result["probe_layer"] = layer
    tok = load_tokenizer(data["tokenizer"])
    val_images, _ = decoded_val(data)
    val_feats, _ = judge_outputs(judge, val_images)
    gen = {}
    for scale in sorted({1.0, float(settings["cfg_scale"])}):
        images, labels = sample_images(model, tok, k, settings["samples_per_class"], scale, settings["sample_seed"])
        feats, pred = judge_outputs(judge, images)
        gen[f"cfg{scale:g}"] = {
            "cfg_scale": scale, "accuracy": float((pred == labels).mean()), "fid": fid_from_features(feats, val_feats),
            "per_class_accuracy": [float((pred[labels == c] == c).mean()) for c in range(k)],
        }
        if scale == float(settings["cfg_scale"]):
            _save_grid(images[:: max(1, settings["samples_per_class"] // 8)] if settings["samples_per_class"] >= 8
                       else images, min(8, settings["samples_per_class"]), settings.get("_grid_path"))
    result["generation"] = gen
    result["eval_seconds"] = round(time.time() - t0, 1)
    return result


def _save_grid(images: np.ndarray, cols: int, path: Optional[str]) -> None:
    if not path or not len(images):
        return
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    im = Image.fromarray(canvas)
    im.resize((im.width * 3, im.height * 3), Image.NEAREST).save(path)


def run_one(out: Path, config: str, seed: int) -> dict:
    """Train one (config, seed) (resuming), evaluate it, write its result.json."""
    from star_scale.config import load_config
    from star_scale.demo import student_from_checkpoint
    from star_scale.trainer import train

    settings = json.loads((out / SETTINGS_FILE).read_text())
    torch.set_num_threads(int(settings["threads"]))
    data = settings["data"]
    name = run_name(config, seed)
    run_dir = out / "runs" / name
    recipe = Path(settings["recipes"]) / f"{config}.yaml"
    overrides = [f"name={name}", f"data.path={data['train']}", f"train.out_dir={run_dir}",
                 f"train.seed={seed}", f"data.seed={seed}", "tracking.enabled=false", "train.device=cpu",
                 *settings["overrides"]]
    cfg = load_config(recipe, overrides)
    t0 = time.time()
    summary = train(cfg, recipe=str(recipe))
    train_seconds = time.time() - t0
    if summary["step"] < cfg.train.steps:
        raise RuntimeError(f"{name}: training stopped at step {summary['step']} of {cfg.train.steps}")
    judge, _ = load_or_train_judge(out, data, settings["classifier_epochs"], settings["samples_per_class"])
    model = student_from_checkpoint(cfg, run_dir)
    ev = evaluate_run(model, data, judge, {**settings, "_grid_path": str(run_dir / "samples.png")},
                      cfg.contrastive_layer())
    layers, heads, width = cfg.model_dims()
    result = {
        "config": config, "seed": seed, "run": name, "steps": cfg.train.steps, "objective": cfg.to_dict()["objective"],
        "model": {"layers": layers, "heads": heads, "width": width, "params": model.num_params()},
        "global_batch": cfg.data.global_batch,
        "train_seconds": round(train_seconds, 1),
        "final_train_metrics": {k: v for k, v in summary.items() if k.startswith(("loss", "acc", "teacher"))},
        **ev,
    }
    _atomic_json(run_dir / RESULT_FILE, result)
    return result


# ---- 4. the table --------------------------------------------------------------------------------------
METRICS = [  # (column, getter, format, better)
    ("probe top-1 %", lambda r: 100 * r["probe_top1"], "{:.1f}", "higher"),
    ("val loss", lambda r: r["val_loss"], "{:.4f}", "lower"),
]


def _gen_metrics(cfg_scale: float) -> list:
    out = []
    for s in sorted({1.0, float(cfg_scale)}):
        key = f"cfg{s:g}"
        out += [(f"gen acc % (CFG {s:g})", lambda r, k=key: 100 * r["generation"][k]["accuracy"], "{:.1f}", "higher"),
                (f"FID (CFG {s:g})", lambda r, k=key: r["generation"][k]["fid"], "{:.2f}", "lower")]
    return out


def _mean_std(values: list[float], fmt: str) -> str:
    """'mean ± sample std' (just the value for one); a signed fmt ('{:+.1f}') signs the mean only."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(float(np.mean(values)))} ± {fmt.replace('+', '').format(float(np.std(values, ddof=1)))}"


def make_table(results: list[dict], configs: list[str], seeds: list[int], cfg_scale: float, judge_info: dict,
               wall_seconds: Optional[float] = None) -> str:
    metrics = METRICS + _gen_metrics(cfg_scale)
    by = {(r["config"], r["seed"]): r for r in results}
    head = "| config | seeds | " + " | ".join(m[0] for m in metrics) + " | paper: FID / probe % |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    for c in configs:
        rs = [by[(c, s)] for s in seeds if (c, s) in by]
        paper = f"{PAPER[c][0]:.2f} / {PAPER[c][1]:.2f}" if c in PAPER else "-"
        lines.append(f"| {TITLES.get(c, c)} | {len(rs)} | " + " | ".join(_mean_std([g(r) for r in rs], f)
                                                                          for _, g, f, _ in metrics) + f" | {paper} |")
    # Paired by seed: config minus the baseline of the same seed.
    diff = []
    if "baseline" in configs:
        diff = ["", "Paired difference to the baseline of the same seed (mean ± std over seeds):", "",
                "| config | pairs | " + " | ".join(f"Δ {m[0]}" for m in metrics) + " |",
                "|" + "---|" * (len(metrics) + 2)]
        for c in configs:
            if c == "baseline":
                continue
            pairs = [(by[(c, s)], by[("baseline", s)]) for s in seeds if (c, s) in by and ("baseline", s) in by]
            cells = []
            for _, g, f, _ in metrics:
                d = [g(a) - g(b) for a, b in pairs]
                cells.append(_mean_std(d, "{:+" + f[2:]) if d else "-")
            diff.append(f"| {TITLES.get(c, c)} | {len(pairs)} | " + " | ".join(cells) + " |")
    any_r = next(iter(results), None)
    notes = [""]
    if any_r:
        m = any_r["model"]
        notes.append(f"Model: {m['layers']} layers x {m['heads']} heads x width {m['width']} ({m['params'] / 1e6:.2f}M "
                     f"params), {any_r['steps']} steps of {any_r['global_batch']} images; probe on layer "
                     f"{any_r['probe_layer']}. Mean ± sample std over seeds {seeds}.")
    notes.append("Paper column: GPT-B on ImageNet 256, 50 epochs (Table 3): Inception FID without CFG, probe top-1 "
                 "over 1000 classes; chance here is 12.5% (8 classes).")
    notes.append(f"Judge (CNN on decoded tokens): {100 * judge_info['val_accuracy']:.1f}% on the validation "
                 f"reconstructions; FID of {judge_info['reference_images']} real training reconstructions vs "
                 f"validation: {judge_info['fid_real_train_vs_val']:.2f} (the floor of the FID columns).")
    if wall_seconds is not None:
        notes.append(f"Wall time of this invocation: {wall_seconds / 60:.1f} min.")
    return "\n".join(lines + diff + notes) + "\n"


# ---- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-scale repro", description=__doc__.split("\n\n")[0] + "\n\n" +
                                "\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.steps=20 (key.sub=value)")
    p.add_argument("--out", default="repro_out", help="output folder (default: repro_out); re-running resumes")
    p.add_argument("--recipes", default=None, help="folder with <config>.yaml recipes (default: the repo's recipes/repro)")
    p.add_argument("--configs", nargs="+", default=CONFIGS, help=f"configs to run (default: {' '.join(CONFIGS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--jobs", type=int, default=None, help="runs at once, one process each (default: min(2, cores))")
    p.add_argument("--per-class", type=int, default=512, help="training images per class (default 512)")
    p.add_argument("--val-per-class", type=int, default=128, help="validation images per class (default 128)")
    p.add_argument("--palette", type=int, default=8, help="colours drawn from a palette of this many (default 8; "
                   "0: any RGB colour, the demo's default); see demo_data.draw_shape")
    p.add_argument("--clutter", type=int, default=3, help="random clutter lines per image (default 3)")
    p.add_argument("--classifier-epochs", type=int, default=20, help="epochs of the judge CNN (default 20)")
    p.add_argument("--samples-per-class", type=int, default=64, help="generated samples per class (default 64)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="CFG scale of the guided samples (default 2.0; "
                   "unguided samples are scored too)")
    p.add_argument("--sample-seed", type=int, default=1234, help="seed of the sampling noise (same for every model)")
    p.add_argument("--probe-epochs", type=int, default=20, help="linear-probe epochs (SGD; default 20)")
    p.add_argument("--prepare-only", action="store_true", help="make the data and the judge, then stop (before a Slurm array)")
    p.add_argument("--task", type=int, default=None, help="run only task i of --list (a Slurm array task), no table")
    p.add_argument("--list", action="store_true", help="print task index -> run, and exit")
    p.add_argument("--table-only", action="store_true", help="print the table of the finished runs (files untouched), train nothing")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: CONFIG:SEED in a worker process
    return p


def _recipes_sha(folder: Path, configs: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.yaml")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _settings(args, out: Path) -> dict:
    recipes = Path(args.recipes) if args.recipes else default_recipes()
    missing = [c for c in args.configs if not (recipes / f"{c}.yaml").is_file()]
    if missing:
        raise SystemExit(f"star-scale repro: no recipe {', '.join(f'{c}.yaml' for c in missing)} in {recipes} (--recipes)")
    jobs = args.jobs or max(1, min(2, os.cpu_count() or 1))
    return {
        "per_class": args.per_class, "val_per_class": args.val_per_class, "seeds_data": [0, 1],
        "palette": args.palette, "clutter": args.clutter,
        "classifier_epochs": args.classifier_epochs, "samples_per_class": args.samples_per_class,
        "cfg_scale": args.cfg_scale, "sample_seed": args.sample_seed, "probe_epochs": args.probe_epochs,
        "overrides": list(args.overrides), "recipes": str(recipes.resolve()), "recipes_sha": _recipes_sha(recipes, args.configs),
        "jobs": jobs, "threads": max(1, (os.cpu_count() or 1) // jobs),
    }


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in RESULT_KEYS if old.get(k) != settings.get(k)]
        if changed and any((out / "runs").glob(f"*/{RESULT_FILE}")):
            raise SystemExit(f"star-scale repro: {out} holds results made with other settings "
                             f"({', '.join(f'{k}: {old.get(k)!r} -> {settings.get(k)!r}' for k in changed)}); "
                             f"use another --out or delete it")


def _launch(out: Path, config: str, seed: int) -> tuple[str, int, int, float]:
    run_dir = out / "runs" / run_name(config, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    threads = str(json.loads((out / SETTINGS_FILE).read_text())["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
    with open(run_dir / "log.txt", "a") as logf:
        rc = subprocess.call([sys.executable, "-m", "star_scale.repro", "--out", str(out), "--run", f"{config}:{seed}"],
                             stdout=logf, stderr=subprocess.STDOUT, env=env)
    return config, seed, rc, time.time() - t0


def collect(out: Path, configs: list[str], seeds: list[int]) -> list[dict]:
    results = []
    for c, s in grid(configs, seeds):
        path = out / "runs" / run_name(c, s) / RESULT_FILE
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def _line(r: dict, cfg_scale: float) -> str:
    g = r["generation"]
    gen = " ".join(f"acc@{v['cfg_scale']:g} {100 * v['accuracy']:.1f}% FID@{v['cfg_scale']:g} {v['fid']:.2f}"
                   for v in g.values())
    return (f"{r['run']}: probe {100 * r['probe_top1']:.1f}% val loss {r['val_loss']:.4f} {gen} "
            f"(train {r['train_seconds']:.0f}s, eval {r['eval_seconds']:.0f}s)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.run:  # a worker process: one run
        logging.basicConfig(level=os.environ.get("STAR_SCALE_LOG", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        config, seed = args.run.rsplit(":", 1)
        run_one(out, config, int(seed))
        return 0
    tasks = grid(args.configs, args.seeds)
    if args.list:
        for i, (c, s) in enumerate(tasks):
            print(f"{i}\t{run_name(c, s)}")
        return 0
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, out)
    if not args.table_only:
        _check_settings(out, settings)
        print(f"star-scale repro: {len(tasks)} runs ({len(args.configs)} configs x {len(args.seeds)} seeds) in {out}, "
              f"{settings['jobs']} at a time x {settings['threads']} threads", flush=True)
        data = prepare_data(out, args.per_class, args.val_per_class, tuple(settings["seeds_data"]),
                            palette=args.palette or None, clutter=args.clutter)
        settings["data"] = data
        _atomic_json(out / SETTINGS_FILE, settings)
        print(f"data: {data['train_images']} train / {data['val_images']} val images, {data['classes']} classes "
              f"({time.time() - t0:.0f}s)", flush=True)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        judge, info = load_or_train_judge(out, data, args.classifier_epochs, args.samples_per_class)
        print(f"judge: {100 * info['val_accuracy']:.1f}% val accuracy, real-vs-real FID "
              f"{info['fid_real_train_vs_val']:.2f} ({time.time() - t0:.0f}s)", flush=True)
        if args.prepare_only:
            return 0
        if args.task is not None:
            if not 0 <= args.task < len(tasks):
                raise SystemExit(f"star-scale repro: --task {args.task}: expected 0..{len(tasks) - 1} (--list)")
            tasks = [tasks[args.task]]
        todo = [(c, s) for c, s in tasks if not (out / "runs" / run_name(c, s) / RESULT_FILE).is_file()]
        if len(todo) < len(tasks):
            print(f"{len(tasks) - len(todo)} runs already done, {len(todo)} to go", flush=True)
        failed = []
        with ThreadPoolExecutor(max_workers=1 if args.task is not None else settings["jobs"]) as pool:
            futures = [pool.submit(_launch, out, c, s) for c, s in todo]
            for future in as_completed(futures):
                config, seed, rc, secs = future.result()
                if rc:
                    failed.append(run_name(config, seed))
                    print(f"{run_name(config, seed)}: FAILED (exit {rc}); see "
                          f"{out / 'runs' / run_name(config, seed) / 'log.txt'}", flush=True)
                else:
                    r = json.loads((out / "runs" / run_name(config, seed) / RESULT_FILE).read_text())
                    print(f"[{time.time() - t0:6.0f}s] {_line(r, args.cfg_scale)}", flush=True)
        if failed:
            print(f"star-scale repro: {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        if args.task is not None:
            return 0
    results = collect(out, args.configs, args.seeds)
    if not results:
        print(f"star-scale repro: no finished runs in {out}", file=sys.stderr)
        return 1
    judge_path = out / "classifier.pt"
    info = torch.load(judge_path, map_location="cpu", weights_only=False)["info"]
    wall = None if args.table_only else time.time() - t0
    table = make_table(results, args.configs, args.seeds, args.cfg_scale, info, wall)
    print()
    print(table, flush=True)
    if args.table_only:  # a look at the results: the files keep the last full invocation's table and wall time
        return 0
    _atomic_text(out / "table.md", table)
    _atomic_json(out / "results.json", {"settings": json.loads((out / SETTINGS_FILE).read_text()),
                                        "judge": info, "wall_seconds": wall, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
