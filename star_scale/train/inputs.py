"""The token store named by ``data.path``, checked before anything is written: one ConfigError per problem."""
from __future__ import annotations

import os
from pathlib import Path

from star_scale.config import Config, ConfigError
from star_scale.data import schema
from star_scale.data.store import open_store

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".jfif")
MAKE = "make one with `star-scale tokenize IMAGES_DIR OUT.zarr --tokenizer ...`"


def _holds_images(folder: Path, limit: int = 10000) -> bool:
    for i, (_, _, files) in enumerate(os.walk(folder)):
        if any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
            return True
        if i >= limit:
            break
    return False


def open_token_store(cfg: Config):
    """``open_store(cfg.data.path)``, or ConfigError ``data.path=...: expected a token store ...``."""
    raw = cfg.data.path
    key = f"data.path={raw}"
    path = Path(raw)
    if not raw:
        raise ConfigError(f"data.path='': expected a token store (a .zarr folder from `star-scale tokenize`, or a .npz)")
    if not path.exists():
        raise ConfigError(f"{key}: expected a token store, but nothing is there ({MAKE})")
    if path.is_dir() and not schema.is_token_store(path):
        what = "a folder of images, not a token store" if _holds_images(path) else "a folder but not a token store"
        raise ConfigError(f"{key}: expected a token store; this is {what} ({MAKE})")
    if path.is_file() and path.suffix != ".npz":
        raise ConfigError(f"{key}: expected a token store (a .zarr folder or a .npz file), got a {path.suffix or 'plain'} file")
    try:
        return open_store(path)
    except Exception as e:  # noqa: BLE001 - whatever makes a store unreadable is a problem of the input
        raise ConfigError(f"{key}: expected a readable token store ({str(e).splitlines()[0]})") from None
