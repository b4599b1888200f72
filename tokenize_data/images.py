"""Image decoding that never raises on bad input, and LlamaGen's ten-crop recipe.

``load_rgb(path, min_side)`` returns an RGB PIL image plus notes on what was
converted, or raises ``SkipImage(reason)``.  Policy:

* zero-byte, unidentifiable (non-image), truncated or corrupt files: skipped;
* palette/grayscale/CMYK/YCbCr/LAB/HSV/1-bit: converted to RGB (noted);
* alpha (RGBA, LA, PA, palette transparency): composited over white (noted);
* 16-bit or 32-bit integer and float images: scaled to 8 bits (noted);
* multi-frame files (GIF, TIFF pages): first frame (noted);
* shorter side < ``min_side``: skipped ("too small"); otherwise images smaller
  than the 1.1x crop are upscaled by the centre-crop's bicubic resize (noted),
  as LlamaGen's ADM centre crop does for every size.

``ten_crops(image, image_size, crop_range)``: ADM ``center_crop_arr`` to
``int(image_size * crop_range)``, then torchvision's ``TenCrop(image_size)``
order: top-left, top-right, bottom-left, bottom-right, centre, then the same
five of the horizontally flipped image.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".tif", ".tiff",
                    ".webp", ".gif")


class SkipImage(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_8bit(im: Image.Image, notes: list, bits: int | None = None) -> Image.Image:
    arr = np.asarray(im)
    if arr.dtype == np.uint8:
        return im
    if np.issubdtype(arr.dtype, np.floating):
        a = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        out = np.clip(a * scale, 0, 255).round().astype(np.uint8)
        notes.append(f"{arr.dtype} float image scaled to 8 bits")
    else:
        a = arr.astype(np.int64)
        top = int(a.max(initial=0))
        if bits is None:
            bits = 8 if top <= 255 else 16 if top <= 65535 else 32
        out = np.clip(a >> (bits - 8), 0, 255).astype(np.uint8) if bits > 8 else np.clip(a, 0, 255).astype(np.uint8)
        notes.append(f"{im.mode} ({arr.dtype}) image scaled from {bits} to 8 bits")
    return Image.fromarray(out)


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def load_rgb(path: str | os.PathLike, min_side: int = 1) -> tuple[Image.Image, list[str]]:
    notes: list[str] = []
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SkipImage(f"unreadable: {e.strerror or e}") from None
    if size == 0:
        raise SkipImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's palette/EXIF/bomb warnings: we decide ourselves
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise SkipImage("not an image (no decoder recognises the file)") from None
        except Image.DecompressionBombError as e:
            raise SkipImage(f"refused: {e}") from None
        except Exception as e:  # noqa: BLE001 - bad input must never stop the job
            raise SkipImage(f"corrupt or unsupported: {type(e).__name__}: {e}") from None
        try:
            with im:
                if getattr(im, "n_frames", 1) > 1:
                    notes.append(f"first of {im.n_frames} frames")
                    im.seek(0)
                im.load()
                im = _convert(im, notes)
        except SkipImage:
            raise
        except Image.DecompressionBombError as e:
            raise SkipImage(f"refused: {e}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise SkipImage(f"truncated or corrupt: {type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise SkipImage(f"cannot decode: {type(e).__name__}: {e}") from None
    w, h = im.size
    if min(w, h) < min_side:
        raise SkipImage(f"too small: {w}x{h}, shorter side under the {min_side} px minimum")
    return im, notes


def _convert(im: Image.Image, notes: list) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info) \
        or (mode in ("L", "RGB") and "transparency" in im.info)
    if has_alpha:
        out = _composite_on_white(im)
        notes.append(f"{mode} with transparency composited over white")
        return out
    if mode.startswith("I;16"):
        return _to_8bit(im, notes, bits=16).convert("RGB")
    if mode in ("I", "F"):
        return _to_8bit(im, notes).convert("RGB")
    if mode in ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        notes.append(f"{mode} converted to RGB")
        return im.convert("RGB")
    arr = np.asarray(im)
    if arr.dtype != np.uint8:
        return _to_8bit(im, notes).convert("RGB")
    notes.append(f"{mode} converted to RGB")
    return im.convert("RGB")


def center_crop_arr(im: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while >= 2x, bicubic-resize the short side to ``size``, crop the centre."""
    while min(*im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    scale = size / min(*im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
    arr = np.asarray(im)
    y = (arr.shape[0] - size) // 2
    x = (arr.shape[1] - size) // 2
    return arr[y: y + size, x: x + size]


def five_crops(arr: np.ndarray, size: int) -> list[np.ndarray]:
    h, w = arr.shape[:2]
    cy, cx = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision's center_crop offsets
    return [arr[:size, :size], arr[:size, w - size:], arr[h - size:, :size], arr[h - size:, w - size:],
            arr[cy: cy + size, cx: cx + size]]


def ten_crops(im: Image.Image, image_size: int, crop_range: float = 1.1) -> np.ndarray:
    """(10, image_size, image_size, 3) uint8 in torchvision TenCrop order."""
    base = center_crop_arr(im, int(image_size * crop_range))
    crops = five_crops(base, image_size) + five_crops(base[:, ::-1], image_size)
    return np.ascontiguousarray(np.stack(crops))


def min_side_for(image_size: int) -> int:
    """Default minimum shorter side: half the crop size (smaller images are skipped, not upscaled)."""
    return max(1, image_size // 2)
