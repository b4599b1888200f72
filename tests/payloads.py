"""Torch files that run code when unpickled in full: built inside the tests, never stored in the repository.

The payload is harmless: ``shutil.copyfile(src, marker)`` (a function torch's
``weights_only=False`` never stops) creates the marker file; a test that finds
the marker knows the file's code ran.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from star_scale.train.checkpoint import listed_file


class CopyOnLoad:
    def __init__(self, src: Path, marker: Path):
        self.src, self.marker = str(src), str(marker)

    def __reduce__(self):
        return shutil.copyfile, (self.src, self.marker)


def save_payload(path: Path, marker: Path, obj: dict | None = None) -> Path:
    """``obj`` (default: a small state dict) with the payload added under ``"x"``, saved to ``path``."""
    src = path.parent / "payload-source.txt"
    src.write_text("the payload ran\n")
    obj = dict(obj if obj is not None else {"model": {"w": torch.zeros(2)}})
    obj["x"] = CopyOnLoad(src, marker)
    torch.save(obj, path)
    return path


def reseal(checkpoint: Path) -> None:
    """Update meta.json's sizes and sha256 to the files now there, as anyone who can write the folder can."""
    meta_path = checkpoint / "meta.json"
    meta = json.loads(meta_path.read_text())
    for name in meta["files"]:
        f = listed_file(checkpoint, name)
        meta["files"][name] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    meta_path.write_text(json.dumps(meta, indent=1))
