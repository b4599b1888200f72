"""Next-token cross-entropy from the last block's output, without the whole fp32 logits tensor at once.

At B x S x 16384 the fp32 logits (plus their softmax gradient) are the
largest activation of a step.  The rows are cut into chunks of at most
``CHUNK_ELEMENTS`` logits; each chunk's norm -> head -> fp32 cross-entropy
runs under activation checkpointing, so forward keeps only each chunk's
summed loss and backward rebuilds one chunk's logits at a time.  With one
chunk (small models, the tests' tiny preset) it is the plain computation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 2**26  # fp32 logits per chunk: 256 MiB


def _chunk_loss(norm, head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(norm(h)).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(norm, head, h: torch.Tensor, targets: torch.Tensor,
                          chunk_elements: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of head(norm(h)) (B, T, V) against targets (B, T); h: (B, T, W)."""
    rows = h.reshape(-1, h.shape[-1])
    flat = targets.reshape(-1)
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    step = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab)
    if step >= rows.shape[0]:
        return _chunk_loss(norm, head, rows, flat) / flat.numel()
    total = sum(checkpoint(_chunk_loss, norm, head, rows[i : i + step], flat[i : i + step], use_reentrant=False)
                for i in range(0, rows.shape[0], step))
    return total / flat.numel()
