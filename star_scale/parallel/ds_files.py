"""DeepSpeed's own checkpoint files (``ds/``), read without running code from them.

DeepSpeed 0.19's ``engine.load_checkpoint`` reads every file through
``engine.checkpoint_engine.load`` (``TorchCheckpointEngine.load``: a full
unpickle): the model states via ``SDLoaderFactory`` and the ZeRO optimizer
partitions via ``_get_all_zero_checkpoint_state_dicts``.  For one load,
``verified_loads`` swaps that method for one that takes only files listed in
the checkpoint's ``meta.json``, reads each file's bytes once, checks them
against the manifest's sha256, and unpickles those same bytes with
``weights_only=True``, allowing only the few DeepSpeed classes its optimizer
state holds.  A replaced file is refused even when its checksum was updated
too: the checksum catches damage, ``weights_only`` catches code.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from star_scale.trust import RefusedFile
from star_scale.trust.load import load_torch, refuse_code

# What ZeRO 0-3 optimizer files pickle beyond tensors (measured: ZeroStageEnum and
# LossScaler at stage 3, plus fragment_address at stages 1 and 2).
DEEPSPEED_CLASSES = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


class ManifestLoad:
    """``checkpoint_engine.load`` for one checkpoint folder: listed, unchanged, weights only."""

    def __init__(self, folder: Path, files: dict):
        self.folder, self.files = folder, files

    def __call__(self, path, map_location=None):
        path = Path(path)
        try:
            name = str(path.resolve().relative_to(self.folder.resolve()))[: -len(".pt")]
        except ValueError:
            name = None
        if name not in self.files or not path.name.endswith(".pt"):
            raise RefusedFile(path, f"DeepSpeed asked for a file that {self.folder / 'meta.json'} does not list")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.files[name]["sha256"]:
            raise RefusedFile(path, f"checksum differs from {self.folder / 'meta.json'} (changed after the "
                                    "checkpoint was verified)")
        return load_torch(io.BytesIO(data), allowed=DEEPSPEED_CLASSES, source=str(path), map_location=map_location)


@contextlib.contextmanager
def verified_loads(ds_engine, folder: Path, files: dict):
    """DeepSpeed reads ``folder``'s files through ``ManifestLoad`` while the block runs."""
    ce = ds_engine.checkpoint_engine
    ce.load = ManifestLoad(folder, files)
    try:
        yield
    finally:
        del ce.load  # the class's method again


def refusal(folder: Path, names: list[str]) -> tuple[str, str] | None:
    """(file, reason) if one of ``names`` (manifest names in ``folder``) would run code when unpickled, else None.

    Reads each file's pickle record only, no tensors.  Checked on every rank
    before any loading starts, so a replaced file stops all ranks together
    instead of one rank while the others wait in a collective.
    """
    for name in names:
        try:
            refuse_code(folder / f"{name}.pt", DEEPSPEED_CLASSES if name.startswith("ds/") else ())
        except RefusedFile as e:
            return e.path, e.reason
    return None
