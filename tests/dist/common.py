"""What the multi-process workers and the pytest side must agree on: configs, batches, reference runs."""
from __future__ import annotations

import functools

import torch

from star_scale.config import load_config

TINY = ["model.preset=tiny", "model.vocab_size=64", "model.num_classes=4", "model.grid_size=4"]
# Every random draw off: dropout and class dropout would differ between layouts by construction.
NO_RANDOMNESS = ["model.class_dropout=0", "model.token_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0"]
# ST-AR with its random draws on: MIM masks and positions come from (seed, step, sample), the
# same in every layout (objectives/draws.py).
STAR = ["objective.name=star", "objective.mask_ratio=0.25", "objective.positions=4", "objective.ema_decay=0.9"]
STEPS = 20
GLOBAL_BATCH = 8


def config(objective: str, *extra: str, world: int = 1):
    obj = STAR if objective == "star" else ["objective.name=ar", "data.micro_batch=2"]
    return load_config(None, TINY + NO_RANDOMNESS + obj + [
        f"data.global_batch={GLOBAL_BATCH}", "optimizer.lr=3e-3", "optimizer.lr_batch=null",
        "train.device=cpu", "train.seed=0", *extra], world_size=world)


def batches(steps: int, views: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same global batches for every layout (a rank takes its data-parallel slice)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (GLOBAL_BATCH, views, 16), generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))
            for _ in range(steps)]


def rank_slice(batch, dp_rank: int, dp: int):
    tokens, labels = batch
    n = tokens.shape[0] // dp
    return tokens[dp_rank * n : (dp_rank + 1) * n], labels[dp_rank * n : (dp_rank + 1) * n]


def build(cfg, meta: bool = True):
    """Model and training module exactly as the trainer builds them (meta: allocated by the engine)."""
    from star_scale.models.build import build_model
    from star_scale.objectives.module import build_training_module
    from star_scale.train.loop import seed_everything

    seed_everything(cfg.train.seed)
    return build_training_module(cfg, build_model(cfg, meta=meta))


@functools.lru_cache(maxsize=None)
def reference_losses(objective: str, steps: int = STEPS, extra: tuple = ()) -> list[float]:
    """One process, LocalEngine: the run every layout must reproduce."""
    from star_scale.train.local_engine import LocalEngine

    cfg = config(objective, *extra)
    module = build(cfg)
    engine = LocalEngine(module, cfg)
    return [engine.train_step(*b)["loss"] for b in batches(steps, module.views)]
