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


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    bg = rng.integers(0, 256, 3)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    d = ImageDraw.Draw(img)
    for _ in range(3):  # background clutter so colour alone does not tell the class
        x, y = rng.uniform(0, size, 2)
        d.line([(x, y), (x + rng.uniform(-size, size) / 3, y + rng.uniform(-size, size) / 3)],
               fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=1)
    fg = tuple(int(c) for c in (bg + 96 + rng.integers(0, 64, 3)) % 256)  # contrasting foreground
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
                     seed: int = 0) -> Path:
    """Write an ImageNet-layout folder: out_dir/<class name>/<index>.png.  Idempotent."""
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes={classes}: expected 1..{len(SHAPES)}")
    out = Path(out_dir)
    for c, kind in enumerate(SHAPES[:classes]):
        folder = out / f"{c:02d}_{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, c])
        for i in range(per_class):
            img = draw_shape(kind, size, rng)
            path = folder / f"{i:05d}.png"
            if not path.exists():
                tmp = path.with_name(f".{path.name}.tmp.png")
                img.save(tmp)
                os.replace(tmp, path)
    return out
