"""What one training step computes: the student (and, for ST-AR, its teacher) and the losses.

Engines (single process here, DeepSpeed/Megatron in parallel/) only call
``module(tokens, labels) -> (loss, metrics)`` and ``module.after_optimizer_step()``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from star_scale.config import Config
from star_scale.models.gpt import GPT
from star_scale.objectives.ar import next_token_loss


class ARModule(nn.Module):
    """LlamaGen's baseline: next-token cross-entropy on one view per image."""

    views = 1

    def __init__(self, student: GPT):
        super().__init__()
        self.student = student

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor):
        """tokens: (B, views, T) codes; labels: (B,)."""
        seq = tokens[:, 0]
        out = self.student(seq[:, :-1], labels)
        loss = next_token_loss(out.logits, seq)
        return loss, {"loss_ar": loss.detach()}

    def after_optimizer_step(self) -> None:
        pass


def build_training_module(cfg: Config, student: GPT) -> nn.Module:
    if cfg.objective.name == "ar":
        return ARModule(student)
    raise NotImplementedError(f"objective.name={cfg.objective.name!r} is not implemented yet")
