"""Import and export LlamaGen class-conditional (c2i) GPT checkpoints.

Our parameter names and tensor layouts equal LlamaGen's (fused ``wqkv`` as
[q | k | v], adjacent-channel rotary pairs, zero rotary at the class position),
so import is unwrapping + prefix stripping + a strict key/shape check; nothing
is permuted.  Head count is not stored in the tensors, so it comes from
LlamaGen's preset table (or the caller).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Mapping, Optional, Union

import torch

from star_scale.models.gpt import GPT, GPTArgs
from star_scale.models.model_file import load_strict, model_state_dict, save_model_file
from star_scale.trust.load import load_torch

# LlamaGen's presets, keyed by what the tensors reveal: (layers, width) -> heads.
LLAMAGEN_HEADS = {
    (12, 768): 12,  # GPT-B
    (24, 1024): 16,  # GPT-L
    (36, 1280): 20,  # GPT-XL
    (48, 1536): 24,  # GPT-XXL
    (48, 2560): 40,  # GPT-XXXL
    (24, 3200): 32,  # GPT-3B
    (22, 2048): 32,  # GPT-1B
}
_WRAPPERS = ("model", "module", "state_dict")  # LlamaGen's own loader tries them in this order
_LAYER = re.compile(r"^layers\.(\d+)\.")


def _is_runtime_buffer(key: str) -> bool:
    # KV caches appear when setup_caches() ran before saving; rotary tables are rebuilt here.
    return key.endswith(("kv_cache.k_cache", "kv_cache.v_cache")) or "freqs_cis" in key


def _strip(key: str) -> str:
    key = key.replace("_orig_mod.", "")  # torch.compile, possibly on submodules
    while key.startswith("module."):  # DDP / DeepSpeed wrappers
        key = key[len("module."):]
    return key


def extract_state_dict(obj, source: str = "checkpoint") -> dict:
    """Find the weights in a loaded checkpoint object and normalise their names."""
    for _ in range(3):  # wrappers can nest, e.g. {"model": {"module": ...}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (or a dict holding one under {_WRAPPERS}), found {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise ValueError(
            f"{source}: not a state dict: no weights under {_WRAPPERS} and the top level "
            f"{'is empty' if not obj else f'holds non-tensor entries {sorted(bad)[:10]}'} "
            f"(top-level keys: {sorted(map(str, obj))[:20]})"
        )
    out = {}
    for key, value in obj.items():
        key = _strip(str(key))
        if not _is_runtime_buffer(key):
            out[key] = value
    return out


def load_llamagen_state_dict(path: str, trust_pickle: bool = False) -> dict:
    """Load a LlamaGen c2i GPT checkpoint file to a CPU state dict in LlamaGen's naming.

    Read with ``weights_only=True``; LlamaGen's train_c2i.py also pickles its
    argparse.Namespace, the one class allowed.  Anything else is refused
    (``RefusedFile``) unless the user passed ``--trust-pickle``.
    """
    obj = load_torch(path, allowed=[argparse.Namespace], trust_pickle=trust_pickle)
    return extract_state_dict(obj, source=path)


def _need(state_dict: Mapping, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"not a LlamaGen c2i GPT state dict: no {key!r} (keys: {sorted(state_dict)[:10]} ...)")
    return state_dict[key]


def infer_args(state_dict: Mapping[str, torch.Tensor], heads: Optional[int] = None, grid_size: int = 16) -> GPTArgs:
    """GPTArgs from tensor shapes; heads from LlamaGen's presets unless given."""
    if any(k.startswith("cls_embedding.cap_proj.") for k in state_dict):
        raise ValueError("this is a LlamaGen text-to-image (t2i) checkpoint; only class-conditional (c2i) is supported")
    vocab_size, width = _need(state_dict, "tok_embeddings.weight").shape
    # LlamaGen adds the null (CFG) class row whenever class dropout > 0, as in all released c2i models.
    num_classes = _need(state_dict, "cls_embedding.embedding_table.weight").shape[0] - 1
    indices = {int(m.group(1)) for k in state_dict if (m := _LAYER.match(k))}
    if not indices:
        raise ValueError("not a LlamaGen GPT state dict: no 'layers.N.' keys")
    layers = max(indices) + 1  # a gap shows up later as missing keys
    wqkv = _need(state_dict, "layers.0.attention.wqkv.weight")
    if tuple(wqkv.shape) != (3 * width, width):
        raise ValueError(f"layers.0.attention.wqkv.weight has shape {tuple(wqkv.shape)}, expected {(3 * width, width)}: "
                         "grouped-query attention (n_kv_head != n_head) is not supported")
    if heads is None:
        if (layers, width) not in LLAMAGEN_HEADS:
            known = ", ".join(f"{l}x{w}->{h}" for (l, w), h in LLAMAGEN_HEADS.items())
            raise ValueError(f"cannot infer the head count of a {layers}-layer, width-{width} model: not a LlamaGen "
                             f"preset (layers x width -> heads: {known}); pass heads= explicitly")
        heads = LLAMAGEN_HEADS[(layers, width)]
    args = GPTArgs(layers=layers, heads=heads, width=width, vocab_size=vocab_size,
                   num_classes=num_classes, grid_size=grid_size)
    if width % heads or args.head_dim % 4:
        raise ValueError(f"width {width} does not split into {heads} heads of a multiple-of-4 size")
    hidden = _need(state_dict, "layers.0.feed_forward.w1.weight").shape[0]
    if hidden != args.ffn_hidden:
        raise ValueError(f"layers.0.feed_forward.w1.weight has {hidden} hidden units but GPTArgs gives {args.ffn_hidden} "
                         f"for width {width} (2/3 * 4 * width rounded up to {args.ffn_multiple_of}); the checkpoint "
                         "was probably trained with a different ffn_dim_multiplier/multiple_of, which is unsupported")
    return args


def import_llamagen(path_or_state_dict: Union[str, Mapping], heads: Optional[int] = None, grid_size: int = 16) -> GPT:
    """Build our GPT from a LlamaGen checkpoint (path, loaded object or state dict), strictly."""
    if isinstance(path_or_state_dict, Mapping):
        source, state_dict = "state dict", extract_state_dict(path_or_state_dict)
    else:
        source, state_dict = str(path_or_state_dict), load_llamagen_state_dict(path_or_state_dict)
    args = infer_args(state_dict, heads=heads, grid_size=grid_size)
    return load_strict(GPT(args), state_dict, source=source)


def export_llamagen(model: GPT) -> dict:
    """State dict in LlamaGen's naming (ours already is); derived buffers left out."""
    return model_state_dict(model)


def convert_checkpoint(ckpt_path: str, out_path: str, heads: Optional[int] = None, grid_size: int = 16,
                       trust_pickle: bool = False) -> dict:
    """LlamaGen checkpoint -> star-scale model file; returns a summary for the CLI."""
    state_dict = load_llamagen_state_dict(ckpt_path, trust_pickle=trust_pickle)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state_dict.values()})
    model = import_llamagen(state_dict, heads=heads, grid_size=grid_size)
    save_model_file(model, out_path)
    return {
        "source": str(ckpt_path),
        "out": str(out_path),
        "args": dataclasses.asdict(model.args),
        "params": model.num_params(),
        "tensors": len(state_dict),
        "source_dtypes": dtypes,  # stored as float32 in the model file
    }
