"""Image tokenizers: LlamaGen's VQ-16 and a small k-means patch tokenizer, one interface.

``load_tokenizer(path_or_name)`` accepts

* a file written by ``Tokenizer.save`` (either kind),
* an official LlamaGen VQ checkpoint (``vq_ds16_c2i.pt``; every key is mapped
  and checked, errors name the file and the keys),
* the name ``vq16`` (or ``vq_ds16_c2i``): the official checkpoint found at
  ``$STAR_SCALE_VQ16`` or ``~/.cache/star_scale/vq_ds16_c2i.pt``.

The patch tokenizer has no pretrained weights; fit one with
``PatchTokenizer.fit(images)`` (``star-scale tokenize --tokenizer patch-kmeans``
does it from the source images).
"""
from __future__ import annotations

import os
from pathlib import Path

from star_scale.tokenizer.base import FORMAT_KEY, Tokenizer, TokenizerError, psnr, reconstruction_grid
from star_scale.tokenizer.patch import PatchTokenizer
from star_scale.tokenizer.vq import VQConfig, VQModel, VQTokenizer, vq_ds16

__all__ = ["Tokenizer", "TokenizerError", "PatchTokenizer", "VQTokenizer", "VQModel", "VQConfig", "vq_ds16",
           "load_tokenizer", "reconstruction_grid", "psnr", "VQ16_NAMES"]

VQ16_NAMES = ("vq16", "vq-16", "vq_ds16_c2i", "vq_ds16_c2i.pt")


def _vq16_path() -> Path:
    env = os.environ.get("STAR_SCALE_VQ16")
    candidates = [Path(env)] if env else []
    candidates.append(Path.home() / ".cache" / "star_scale" / "vq_ds16_c2i.pt")
    for c in candidates:
        if c.is_file():
            return c
    raise TokenizerError("the VQ-16 tokenizer needs LlamaGen's weights vq_ds16_c2i.pt (from the LlamaGen release, "
                         "https://huggingface.co/FoundationVision/LlamaGen); none found at "
                         f"{', '.join(map(str, candidates))}. Pass its path, or set STAR_SCALE_VQ16. "
                         "Without weights, use the small tokenizer: --tokenizer patch-kmeans")


def load_tokenizer(path_or_name: str | os.PathLike, *, device: str = "cpu", image_size: int | None = None,
                   trust_pickle: bool = False) -> Tokenizer:
    """Load a tokenizer from a file (either kind, or an official LlamaGen VQ checkpoint) or the name ``vq16``.

    Files load with ``weights_only=True``; ``trust_pickle`` (the user's ``--trust-pickle``) unpickles in full.
    """
    if isinstance(path_or_name, Tokenizer):
        return path_or_name
    name = str(path_or_name)
    path = Path(name)
    if not path.exists():
        if name.lower() in VQ16_NAMES:
            path = _vq16_path()
        else:
            raise TokenizerError(f"tokenizer {name!r}: no such file, and not a known name ({', '.join(VQ16_NAMES[:1])})")
    if path.is_dir():
        raise TokenizerError(f"tokenizer {name!r} is a directory; pass the checkpoint file")
    from star_scale.tokenizer.vq import _torch_load

    obj = _torch_load(path, trust_pickle=trust_pickle)
    meta = obj.get(FORMAT_KEY) if isinstance(obj, dict) else None
    if meta is not None and meta.get("kind") == PatchTokenizer.kind:
        return PatchTokenizer.from_saved(obj, str(path))
    if meta is not None and meta.get("kind") not in (None, VQTokenizer.kind):
        raise TokenizerError(f"{path}: unknown tokenizer kind {meta.get('kind')!r}")
    return VQTokenizer.from_checkpoint(path, image_size=image_size, device=device, obj=obj)
