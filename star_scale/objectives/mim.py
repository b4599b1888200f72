"""L_MIM: cosine distance between the masked student's and the teacher's last-layer features.

The input tokens are never replaced; the student's masking happens in its
attention (see ``masks.mim_key_mask``).  Which "last-layer features" are
compared is ``objective.mim_features`` [inferred]: ``norm`` (default) = after
the final RMSNorm, i.e. what the output head reads; ``block`` = the last
block's raw output.  The mean runs over every position of every sequence
(the class position included).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_similarity(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-position cosine similarity of (..., D) features, in float32 -> (...)."""
    return F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=eps)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over positions of 1 - cos(student, teacher); the teacher is detached."""
    return (1.0 - cosine_similarity(student, teacher.detach(), eps)).mean()


def last_layer_features(model, block_output: torch.Tensor, which: str = "norm") -> torch.Tensor:
    """The features L_MIM compares: ``model.norm(h)`` for "norm", ``h`` itself for "block"."""
    if which == "norm":
        return model.norm(block_output)
    if which == "block":
        return block_output
    raise ValueError(f"mim features {which!r}: expected 'norm' or 'block'")
