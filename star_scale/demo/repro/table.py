"""repro, step 4: the table of every config over seeds, paired against the baseline."""
from __future__ import annotations

from typing import Optional

import numpy as np

from star_scale.demo.repro.plan import PAPER, TITLES

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
               wall_seconds: Optional[float] = None, classes: int = 8) -> str:
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
                 f"over 1000 classes; chance here is {100 / classes:.3g}% ({classes} classes).")
    notes.append(f"Judge (CNN on decoded tokens): {100 * judge_info['val_accuracy']:.1f}% on the validation "
                 f"reconstructions; FID of {judge_info['reference_images']} real training reconstructions vs "
                 f"validation: {judge_info['fid_real_train_vs_val']:.2f} (the floor of the FID columns).")
    if wall_seconds is not None:
        notes.append(f"Wall time of this invocation: {wall_seconds / 60:.1f} min.")
    return "\n".join(lines + diff + notes) + "\n"
