"""What a run costs, from its config alone: views per sample, N parameters, training FLOPs."""
from __future__ import annotations

from star_scale.config import Config


def views(cfg: Config) -> int:
    from star_scale.objectives.module import ARModule, STARModule

    return {"ar": ARModule.views, "star": STARModule.views}[cfg.objective.name]


def model_params(cfg: Config, kind: str = "total") -> int:
    """N: all parameters (`total`) or the transformer blocks' only (`non_embedding`)."""
    from star_scale.models.build import gpt_args
    from star_scale.slurm.plan import count_params

    total, block = count_params(cfg)
    return total if kind == "total" else gpt_args(cfg).layers * block


def train_flops_per_token(cfg: Config) -> float:
    """The model's training FLOPs per token (ST-AR: x its teacher's extra forward), from shapes only."""
    import torch

    from star_scale.models.build import build_model
    from star_scale.objectives.module import build_training_module

    with torch.device("meta"):
        model = build_model(cfg)
        module = build_training_module(cfg, model)
    return float(model.flops_per_token(training=True) * getattr(module, "flops_factor", 1.0))


def flops(cfg: Config, n_params: int, tokens: float, mode: str) -> float:
    return 6.0 * n_params * tokens if mode == "6ND" else train_flops_per_token(cfg) * tokens
