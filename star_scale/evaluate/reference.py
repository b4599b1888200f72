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
from typing import NamedTuple, Optional

from star_scale.evaluate.adm_npz import check_images, npz_keys

log = logging.getLogger(__name__)


class Known(NamedTuple):
    resolution: int
    sha256: Optional[str] = None  # None: no published digest to pin
    size: Optional[int] = None    # bytes; checked before hashing, so a partial download is named at once


# OpenAI guided-diffusion's reference batches (openaipublic.blob.core.windows.net/diffusion/jul-2021/
# ref_batches/).  The 256 px digest and size are the ones independent public evaluation setups check
# their downloads against (they agree, and match a Git LFS copy's object id); the other batches have
# no digest published anywhere we could read, so only their resolution is checked.
KNOWN_REFERENCES: dict[str, Known] = {
    "VIRTUAL_imagenet64_labeled.npz": Known(64),
    "VIRTUAL_imagenet128_labeled.npz": Known(128),
    "VIRTUAL_imagenet256_labeled.npz": Known(
        256, "b32732719497e42660a9affb4a966068cba0855ac449b82015e34ec376d20758", 2_037_122_530),
    "VIRTUAL_imagenet512.npz": Known(512),
    "VIRTUAL_lsun_bedroom256.npz": Known(256),
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
        resolution = known.resolution
        if stored is not None and stored != resolution:
            raise ValueError(f"{path}: named like the ADM {resolution} px reference batch but holds {stored} px images")
        _check_bytes(path, known, sha256 or sha256_of)
    else:
        match = re.search(r"imagenet(\d+)", path.name)
        resolution = stored or (int(match.group(1)) if match else None)
    if resolution is not None and sample_resolution is not None and resolution != sample_resolution:
        raise ValueError(f"{path}: reference batch at {resolution} px, samples at {sample_resolution} px: "
                         f"FID is only comparable at one resolution; use the {sample_resolution} px reference "
                         f"(e.g. VIRTUAL_imagenet{sample_resolution}_labeled.npz) or sample at {resolution} px")
    return resolution


def _check_bytes(path: Path, known: Known, sha256) -> None:
    """Warn (the numbers are still computed) when a pinned file's bytes are not the published ones."""
    if known.sha256 is None:
        return
    size = path.stat().st_size
    if known.size is not None and size != known.size:
        log.warning("%s: %d bytes, but the published file has %d (sha256 %s): a partial or different "
                    "download gives different FID", path, size, known.size, known.sha256)
        return
    digest = sha256(path)
    if digest != known.sha256:
        log.warning("%s: sha256 %s differs from the published file's %s: a partial or different "
                    "download gives different FID", path, digest, known.sha256)
