"""Config -> model: the one place a recipe's model section becomes a GPT."""
from __future__ import annotations

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


def build_model(cfg: Config, **layer_factories) -> GPT:
    return GPT(gpt_args(cfg), **layer_factories)
