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


def materialize(module: nn.Module, device: torch.device, value_for: Optional[Callable] = None,
                after_unit: Optional[Callable] = None) -> None:
    """Allocate every GPT of ``module`` still on the meta device (student, teacher copy) on ``device``;
    ``value_for(gpt)``: its ``GPT.materialize`` value function (default: the whole initial weights)."""
    for gpt in [m for m in module.modules() if isinstance(m, GPT) and m.is_meta()]:
        gpt.materialize(device, value=value_for(gpt) if value_for else None, after_unit=after_unit)
