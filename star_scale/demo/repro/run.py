"""repro, step 3: one (config, seed) run: train (resuming), evaluate, write result.json."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from star_scale.demo.repro.judge import Judge, decoded_val, judge_outputs, load_or_train_judge
from star_scale.demo.repro.plan import RESULT_FILE, SETTINGS_FILE, _atomic_json, read_split, run_name


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
                  batch: int = 256, top_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """per_class samples of every class, uint8 (N, H, W, 3), with the same per-sample noise for every model."""
    from star_scale.models.generate import generate

    labels = torch.arange(num_classes).repeat_interleave(per_class)
    t = model.args.grid_size ** 2
    noise = torch.rand(len(labels), t, generator=torch.Generator().manual_seed(seed))
    codes = [generate(model, labels[s: s + batch], cfg_scale=cfg_scale, temperature=1.0, top_k=top_k, top_p=1.0,
                      noise=noise[s: s + batch]) for s in range(0, len(labels), batch)]
    return np.asarray(tokenizer.decode(torch.cat(codes))), labels.numpy()


def evaluate_run(model, data: dict, judge: Judge, settings: dict, layer: int) -> dict:
    from star_scale.data.store import open_store
    from star_scale.evaluate.metrics import fid_from_features
    from star_scale.evaluate.probe import probe_accuracy
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
    from star_scale.demo.student import student_from_checkpoint
    from star_scale.train.loop import train
    from star_scale.train.report import write_report

    settings = json.loads((out / SETTINGS_FILE).read_text())
    torch.set_num_threads(int(settings["threads"]))
    data = settings["data"]
    name = run_name(config, seed)
    run_dir = out / "runs" / name
    recipe = Path(settings["recipes"]) / f"{config}.yaml"
    overrides = [f"name={name}", f"data.path={data['train']}", f"train.out_dir={run_dir}",
                 f"train.seed={seed}", f"data.seed={seed}", "tracking.enabled=false", "train.device=cpu",
                 "train.restart=true",  # a run killed before its first checkpoint starts over (old files moved aside)
                 *settings.get("dataset_overrides", []), *settings["overrides"]]
    cfg = load_config(recipe, overrides)
    t0 = time.time()
    summary = train(cfg, recipe=str(recipe))
    train_seconds = time.time() - t0
    if summary["step"] < cfg.train.steps:
        raise RuntimeError(f"{name}: training stopped at step {summary['step']} of {cfg.train.steps}")
    write_report(run_dir, mlflow=False)
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
