"""A class-labelled image set the project generates: coloured shapes on textured backgrounds.

Each class is a shape; within a class, position, scale, rotation, and colours
vary, so recognising the class needs global, position-invariant features
(ST-AR's point) rather than local colour statistics.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond", "bars", "star"]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    elif kind == "square":
        pts = [(math.cos(angle + math.pi / 4 + k * math.pi / 2), math.sin(angle + math.pi / 4 + k * math.pi / 2)) for k in range(4)]
    elif kind == "diamond":
        pts = [(0.6 * math.cos(angle + k * math.pi / 2) if k % 2 else math.cos(angle + k * math.pi / 2),
                0.6 * math.sin(angle + k * math.pi / 2) if k % 2 else math.sin(angle + k * math.pi / 2)) for k in range(4)]
    else:  # star
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(angle + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(angle + k * math.pi / 5)) for k in range(10)]
    return [(cx + r * x, cy + r * y) for x, y in pts]


# Distinct, saturated colours for ``palette=N`` (the first N are used).
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (250, 250, 250), (20, 20, 20), (128, 128, 0), (0, 0, 128)]


def draw_shape(kind: str, size: int, rng: np.random.Generator, palette: int | None = None,
               clutter: int = 3) -> Image.Image:
    """One image of ``kind``.  palette=None: any RGB colours; palette=N: background, shape and
    clutter colours from the first N of ``PALETTE`` (shape != background).  clutter: random lines."""
    if palette is not None and not 2 <= palette <= len(PALETTE):
        raise ValueError(f"palette={palette}: expected 2..{len(PALETTE)} colours or None")
    bg_i = int(rng.integers(palette)) if palette else None
    bg = rng.integers(0, 256, 3) if palette is None else np.array(PALETTE[bg_i])
    img = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    d = ImageDraw.Draw(img)
    for _ in range(clutter):  # background clutter so colour alone does not tell the class
        x, y = rng.uniform(0, size, 2)
        end = (x + rng.uniform(-size, size) / 3, y + rng.uniform(-size, size) / 3)
        colour = rng.integers(0, 256, 3) if palette is None else PALETTE[int(rng.integers(palette))]
        d.line([(x, y), end], fill=tuple(int(c) for c in colour), width=1)
    if palette is None:
        fg = tuple(int(c) for c in (bg + 96 + rng.integers(0, 64, 3)) % 256)  # contrasting foreground
    else:
        fg = PALETTE[(bg_i + 1 + int(rng.integers(palette - 1))) % palette]
    r = rng.uniform(0.18, 0.34) * size
    cx, cy = rng.uniform(r, size - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        d.ellipse(box, fill=fg)
    elif kind == "ring":
        d.ellipse(box, outline=fg, width=max(2, int(r / 3)))
    elif kind == "cross":
        w = max(2, int(r / 2.5))
        d.rectangle([cx - r, cy - w / 2, cx + r, cy + w / 2], fill=fg)
        d.rectangle([cx - w / 2, cy - r, cx + w / 2, cy + r], fill=fg)
    elif kind == "bars":
        w = max(1, int(r / 4))
        for k in (-1, 0, 1):
            off = k * 2 * w
            d.rectangle([cx - r, cy + off - w / 2, cx + r, cy + off + w / 2], fill=fg)
    else:
        d.polygon(_polygon(kind, cx, cy, r, angle), fill=fg)
    return img


def make_demo_images(out_dir: str | os.PathLike, classes: int = 8, per_class: int = 64, size: int = 36,
                     seed: int = 0, palette: int | None = None, clutter: int = 3) -> Path:
    """Write an ImageNet-layout folder: out_dir/<class name>/<index>.png.  Idempotent (existing files are
    kept, so use a fresh folder for other options).  palette, clutter: see ``draw_shape``."""
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes={classes}: expected 1..{len(SHAPES)}")
    out = Path(out_dir)
    for c, kind in enumerate(SHAPES[:classes]):
        folder = out / f"{c:02d}_{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, c])
        for i in range(per_class):
            img = draw_shape(kind, size, rng, palette=palette, clutter=clutter)
            path = folder / f"{i:05d}.png"
            if not path.exists():
                tmp = path.with_name(f".{path.name}.tmp.png")
                img.save(tmp)
                os.replace(tmp, path)
    return out
