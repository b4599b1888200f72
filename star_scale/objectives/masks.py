"""Random draws of ST-AR's student side: MIM key masks and contrastive positions.

Both take their uniforms from ``scores`` when given (the layout-independent
per-step table of ``draws.py``), else from the torch RNG of the device.  Sequence layout is the GPT's: position 0
is the class token, positions 1..S-1 are image tokens.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def masked_count(seq_len: int, ratio: float) -> int:
    """Key columns masked per sequence: round(ratio * (S - 1)), the class column never."""
    return int(math.floor(ratio * (seq_len - 1) + 0.5))


def mim_key_mask(batch: int, seq_len: int, ratio: float, *, device=None,
                 scores: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """(B, S) bool key mask, True = visible, for the MIM student's attention.

    Each sequence independently masks exactly ``masked_count(S, ratio)`` of its
    image-token columns 1..S-1, drawn uniformly without replacement; column 0
    (the class token) is never masked.  The GPT combines the mask with the
    causal one and keeps the diagonal visible (a query always sees itself), so
    no softmax row is empty; one mask is shared by all layers and heads.

    Returns None when nothing would be masked (e.g. ratio 0): the caller then
    runs the plain causal forward, bit for bit.
    """
    n = masked_count(seq_len, ratio)
    if n == 0:
        return None
    if scores is None:
        scores = torch.rand(batch, seq_len - 1, device=device)
    hidden = scores.topk(n, dim=1).indices + 1  # masked columns, in 1..S-1
    visible = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    return visible.scatter_(1, hidden, False)


def sample_positions(batch: int, seq_len: int, k: int, *, device=None,
                     scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, K) int64: K distinct image positions (1..S-1) per sequence, uniformly at random."""
    if not 1 <= k <= seq_len - 1:
        raise ValueError(f"cannot sample {k} distinct positions from {seq_len - 1} image positions")
    if scores is None:
        scores = torch.rand(batch, seq_len - 1, device=device)
    return scores.topk(k, dim=1).indices + 1
