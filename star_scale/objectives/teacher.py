"""ST-AR's EMA teacher: a weights-only copy of the student, updated after every optimizer step.

teacher <- d * teacher + (1 - d) * student, d = ``objective.ema_decay`` (0.9999,
no schedule).  The teacher is built as a copy of the student (same
architecture, same initial weights), its parameters have ``requires_grad``
False (so no optimizer, no grads, no optimizer state ever touches them), it
stays in eval mode (no dropout, no class dropout: it sees the true labels and
the unmasked views), and its forward runs under ``torch.no_grad`` without the
output head (``logits=False``).  It is a submodule, so it is saved and loaded
with the training module's state_dict.

The update itself is ``ema_update_``: a function over matching (teacher,
student) tensor lists, so a sharded engine can apply it to each rank's local
partitions.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], decay: float) -> None:
    """In place: t <- decay * t + (1 - decay) * s for every pair; tensors pair up by index."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"EMA update: {len(teacher)} teacher tensors but {len(student)} student tensors")
    if not teacher:
        return
    student = [s.detach() for s in student]
    torch._foreach_mul_(teacher, decay)
    torch._foreach_add_(teacher, student, alpha=1.0 - decay)


class EMATeacher(nn.Module):
    """Holds the teacher GPT as ``self.model``; see the module docstring."""

    def __init__(self, student: nn.Module, decay: float = 0.9999):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay {decay}: expected 0 <= d <= 1")
        self.decay = decay
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.model.eval()
        self._pairs_checked = False

    def train(self, mode: bool = True) -> "EMATeacher":
        """Always eval: the engine's ``module.train()`` must not switch on the teacher's dropout."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, tokens, labels, **kwargs):
        kwargs.setdefault("logits", False)
        return self.model(tokens, labels, **kwargs)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Reset the teacher to the student's current weights (e.g. after loading pretrained weights)."""
        for t, s in zip(*self._pairs(student)):
            t.copy_(s)

    def update(self, student: nn.Module) -> None:
        ema_update_(*self._pairs(student), self.decay)

    def _pairs(self, student: nn.Module):
        t = list(self.model.named_parameters())
        s = list(student.named_parameters())
        if not self._pairs_checked:
            if [n for n, _ in t] != [n for n, _ in s] or any(a.shape != b.shape for (_, a), (_, b) in zip(t, s)):
                raise ValueError("teacher and student parameters do not match (names or shapes)")
            self._pairs_checked = True
        return [p for _, p in t], [p for _, p in s]
