"""star-scale's single-file model format: ``{"format", "args", "model"}`` in one torch file.

``args`` is ``dataclasses.asdict(GPTArgs)`` and ``model`` the parameter state dict
(no buffers: the rotary table is rebuilt from ``args``), so the file loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from star_scale import atomic
from star_scale.models.gpt import GPT, GPTArgs
from star_scale.trust import RefusedFile
from star_scale.trust.load import load_torch

FORMAT = "star-scale-model-v1"
_LIST_LIMIT = 20  # keys shown per category in a mismatch error


def model_state_dict(model: torch.nn.Module) -> dict:
    """Parameters only: buffers (``rope``) are derived, not weights."""
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k not in buffers}


def _fmt(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:_LIST_LIMIT])
    return shown + (f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def load_strict(model: GPT, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> GPT:
    """Load with every key accounted for; ValueError lists missing, unexpected and mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model_state_dict(model).items()}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    shapes = sorted(
        f"{k} (expected {expected[k]}, got {tuple(v.shape)})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    )
    if missing or unexpected or shapes:
        lines = [f"{source} does not match GPT({model.args}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_fmt(shapes)}")
        raise ValueError("\n".join(lines))
    # strict=False only because the non-persistent rope buffer is absent by design; keys were checked above.
    model.load_state_dict(dict(state_dict), strict=False)
    return model


def save_model_file(model: GPT, path: str) -> None:
    """Write atomically (a crash leaves the old file or the new one)."""
    atomic.torch_save({"format": FORMAT, "args": dataclasses.asdict(model.args), "model": model_state_dict(model)}, path)


def load_model_file(path: str) -> GPT:
    """Read a file written by ``save_model_file`` into a CPU GPT."""
    try:
        obj = load_torch(path)  # weights only: a pickle that runs code is refused, naming the file
    except RefusedFile as e:
        raise RefusedFile(path, f"not a star-scale model file: {e.reason}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = f"a dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: not a star-scale model file (expected format {FORMAT!r}, found {found})")
    fields = {f.name for f in dataclasses.fields(GPTArgs)}
    unknown = sorted(set(obj["args"]) - fields)
    if unknown:
        raise ValueError(f"{path}: model args has fields this GPTArgs does not know: {unknown}")
    model = GPT(GPTArgs(**obj["args"]))
    return load_strict(model, obj["model"], source=path)
