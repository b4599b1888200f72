"""ADM reference batches as users meet them: which file, which resolution, which bytes.

The reference batch must match the samples' resolution (256 px samples against
``VIRTUAL_imagenet256_labeled.npz``); FID against another resolution's batch is a
different number, silently.  Known file names carry their resolution; a
pinned sha256 catches a truncated or different download (a warning, the
numbers are still computed).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

from star_scale.evaluate.adm_npz import check_images, npz_keys

log = logging.getLogger(__name__)

# OpenAI guided-diffusion's reference batches -> (resolution, sha256 or None when no verified copy
# was at hand to hash; add it from a verified download).
KNOWN_REFERENCES: dict[str, tuple[int, Optional[str]]] = {
    "VIRTUAL_imagenet64_labeled.npz": (64, None),
    "VIRTUAL_imagenet128_labeled.npz": (128, None),
    "VIRTUAL_imagenet256_labeled.npz": (256, None),
    "VIRTUAL_imagenet512.npz": (512, None),
    "VIRTUAL_lsun_bedroom256.npz": (256, None),
}


def image_resolution(path: str | os.PathLike) -> Optional[int]:
    """Side of an ADM .npz's arr_0 images (None for feature or statistics files)."""
    if "arr_0" not in npz_keys(path):
        return None
    _, h, w, _ = check_images(path)
    if h != w:
        raise ValueError(f"{path}: arr_0 images are {h}x{w}; the ADM evaluator expects square images")
    return int(h)


def check_reference(ref_path: str | os.PathLike, sample_resolution: Optional[int], sha256=None) -> Optional[int]:
    """The reference's resolution; ValueError when it differs from the samples' (or from its own name)."""
    from star_scale.evaluate.inception_default import sha256_of

    path = Path(ref_path)
    known = KNOWN_REFERENCES.get(path.name)
    stored = image_resolution(path)
    if known is not None:
        resolution, pinned = known
        if stored is not None and stored != resolution:
            raise ValueError(f"{path}: named like the ADM {resolution} px reference batch but holds {stored} px images")
        if pinned is not None:
            digest = (sha256 or sha256_of)(path)
            if digest != pinned:
                log.warning("%s: sha256 %s differs from the published file's %s: a partial or different "
                            "download gives different FID", path, digest, pinned)
    else:
        match = re.search(r"imagenet(\d+)", path.name)
        resolution = stored or (int(match.group(1)) if match else None)
    if resolution is not None and sample_resolution is not None and resolution != sample_resolution:
        raise ValueError(f"{path}: reference batch at {resolution} px, samples at {sample_resolution} px: "
                         f"FID is only comparable at one resolution; use the {sample_resolution} px reference "
                         f"(e.g. VIRTUAL_imagenet{sample_resolution}_labeled.npz) or sample at {resolution} px")
    return resolution
