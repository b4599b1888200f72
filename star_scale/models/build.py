"""Config -> model: the one place a recipe's model section becomes a GPT."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn as nn

from star_scale.config import Config
from star_scale.models.gpt import GPT, GPTArgs


def gpt_args(cfg: Config) -> GPTArgs:
    layers, heads, width = cfg.model_dims()
    m = cfg.model
    return GPTArgs(
        layers=layers, heads=heads, width=width,
        vocab_size=m.vocab_size, num_classes=m.num_classes, grid_size=m.grid_size,
        class_dropout=m.class_dropout, token_dropout=m.token_dropout,
        resid_dropout=m.resid_dropout, ffn_dropout=m.ffn_dropout, init_std=m.init_std,
    )


def build_model(cfg: Config, meta: bool = False, **layer_factories) -> GPT:
    """meta: no memory until an engine allocates it (``materialize``), as its layout needs, one unit at a
    time; the weights are the same either way (``GPT.initial_value``)."""
    with torch.device("meta") if meta else contextlib.nullcontext():
        return GPT(gpt_args(cfg), **layer_factories)


def materialize(modules, device: torch.device, value_for: Optional[Callable] = None, after_unit=None) -> None:
    """Allocate every GPT still on the meta device (student, teacher copy) of ``modules`` (a module or a
    list) on ``device``; ``value_for(gpt)``: its ``GPT.materialize`` value function (default: the whole
    initial weights), which must depend on the GPT only through its seed and args; ``after_unit``: one
    callable for every GPT, or one per module.  Copies of one GPT (same seed, args, parameters: a student
    and its EMA teacher) are filled together, each weight drawn once for all of them."""
    modules = list(modules) if isinstance(modules, (list, tuple)) else [modules]
    afters = list(after_unit) if isinstance(after_unit, (list, tuple)) else [after_unit] * len(modules)
    groups: dict = {}
    for module, after in zip(modules, afters):
        for gpt in [m for m in module.modules() if isinstance(m, GPT) and m.is_meta()]:
            key = (gpt.init_seed, repr(gpt.args), tuple((n, tuple(p.shape)) for n, p in gpt.named_parameters()))
            groups.setdefault(key, []).append((gpt, after))
    for (first, after), *twins in groups.values():
        first.materialize(device, value=value_for(first) if value_for else None, after_unit=after, twins=twins)
