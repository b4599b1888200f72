"""ST-AR's random draws (MIM masks, contrastive positions) as a function of (seed, step, sample).

Drawing from each rank's own RNG would make a run depend on its layout: 2
ranks would mask other columns than 1 process on the same global batch, and
an elastic resume would change the masks.  Instead every optimizer step
draws one table of uniforms for the whole global batch from (seed, step,
stream), and each rank and micro-batch takes its rows.  Nothing to
checkpoint: a resumed step draws the same table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MASK, POSITIONS = 0, 1  # streams


@dataclass
class StepDraws:
    seed: int
    step: int
    first: int  # this micro-batch's first image within the global batch
    total: int  # images in the global batch

    def uniform(self, stream: int, images: int, views: int, width: int, device=None) -> torch.Tensor:
        """(images * views, width) uniforms for this micro-batch's sequences (image-major, as the module flattens)."""
        seed = int(np.random.SeedSequence([self.seed, self.step, stream]).generate_state(1, np.uint64)[0] >> 1)
        device = torch.device(device or "cpu")
        # Drawn on the device itself (no host copy, no sync); CUDA's stream differs from the CPU's,
        # but every layout on one device type slices the same table.
        g = torch.Generator(device=device).manual_seed(seed)
        table = torch.rand(self.total * views, width, generator=g, device=device)
        return table[self.first * views : (self.first + images) * views]


def set_step_draws(module, seed: int, step: int, first: int, total: int) -> None:
    """Engines call this before each micro-batch forward (a module without draws ignores it)."""
    if hasattr(module, "draws"):
        module.draws = StepDraws(seed, step, first, total)


def begin_step(module, tokens, labels, micro_batch: int) -> None:
    """Engines call this once per optimizer step, after set_step_draws for the rank's first image."""
    if hasattr(module, "begin_step"):
        module.begin_step(tokens, labels, micro_batch)


def end_step(module) -> None:
    if hasattr(module, "end_step"):
        module.end_step()
