"""L_step and L_view: InfoNCE between the student's projected middle-layer states and teacher features.

Shapes: ``b`` local images, ``M`` views each, ``S`` positions, ``K`` sampled
positions per sequence (``masks.sample_positions``: K distinct image positions
1..S-1, drawn independently for every sequence), ``W`` model width.

- Anchors: the student's middle-layer states at the K sampled positions of
  every view, through the student-only projector MLP (output width = W, no
  centering).  Gradients flow only through these (local) anchors.
- L_step positives: for anchor (image n, view m, position i), the teacher
  feature at every *other* sampled position j != i of the same view; each
  (i, j) is one InfoNCE pair, so a sequence gives K (K - 1) pairs.
- L_view positives: for anchor (n, m, position p), the teacher feature at the
  same position p in every other view m' != m (one pair for M = 2).
- Negatives (both terms) [documented choice]: the teacher features at the
  sampled positions of every view of every *other* image of the global batch,
  i.e. (N_global - 1) * M * K candidates per anchor, gathered across the
  data-parallel ranks by ``gather_negatives`` and across the micro-batches of
  gradient accumulation (``STARModule.begin_step``).  The anchor's own image never
  contributes negatives, and the other positives of a multi-positive anchor
  are not negatives of its pairs.
- Teacher features are the raw middle-layer block outputs (no projector).
  Every feature is l2-normalised; logits are cosine / temperature.
- Accuracy: the fraction of pairs whose positive scores strictly above every
  negative.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    """Student-side MLP width -> hidden -> width (Linear, GELU, Linear) [inferred shape].

    ``hidden`` defaults to the model width (``objective.projector_hidden``).
    """

    def __init__(self, width: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or width
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def gather_negatives(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """All-gather teacher features along dim 0 across the data-parallel group.

    Returns (gathered, offset): ``gathered[offset : offset + len(x)]`` is ``x``.
    The features are teacher outputs (no gradient), so a plain all_gather is
    enough.  Without an initialised process group (or with one rank) this is
    the identity.  Every rank must pass the same shape.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return x, 0
    world = dist.get_world_size(group)
    if world == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts), dist.get_rank(group) * x.shape[0]


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             negative_mask: Optional[torch.Tensor], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-pair InfoNCE on l2-normalised features.

    anchors: (N, D); positives: (N, P, D), each (anchor, positive) one pair;
    negatives: (Q, D) shared candidates; negative_mask: (N, Q) bool, True = a
    negative of that anchor (None: all).  For pair (n, p):
    loss = -log( e^{s_np/tau} / (e^{s_np/tau} + sum_q e^{s_nq/tau}) ), s = cosine.
    Returns (mean loss over the N * P pairs, accuracy = fraction of pairs whose
    positive scores strictly above every negative).  Float32 throughout.
    """
    a = F.normalize(anchors.float(), dim=-1)
    pos = F.normalize(positives.float(), dim=-1)
    neg = F.normalize(negatives.float(), dim=-1)
    pos_logits = torch.einsum("nd,npd->np", a, pos) / temperature  # (N, P)
    neg_logits = (a @ neg.T) / temperature  # (N, Q)
    if negative_mask is not None:
        neg_logits = neg_logits.masked_fill(~negative_mask, float("-inf"))
    neg_lse = torch.logsumexp(neg_logits, dim=-1, keepdim=True)  # (N, 1); -inf when no negatives
    loss = (torch.logaddexp(pos_logits, neg_lse) - pos_logits).mean()
    with torch.no_grad():
        acc = (pos_logits > neg_logits.max(dim=-1, keepdim=True).values).float().mean()
    return loss, acc


@functools.lru_cache(maxsize=32)
def others_index(n: int, device: torch.device) -> torch.Tensor:
    """(n, n-1): row i lists 0..n-1 without i.  Cached: built (and copied to the device) once."""
    return torch.tensor([[j for j in range(n) if j != i] for i in range(n)], device=device)


def gather_at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x: (R, S, D), positions: (R, K) -> (R, K, D)."""
    return torch.gather(x, 1, positions[..., None].expand(-1, -1, x.shape[-1]))


def negative_bank(teacher_sampled: torch.Tensor, group=None):
    """(b, M, K, W) local sampled teacher features -> (bank (Q, W), owner (Q,), local image ids (b,))."""
    b, m, k, w = teacher_sampled.shape
    gathered, offset = gather_negatives(teacher_sampled.reshape(b, m * k, w), group)
    owner = torch.arange(gathered.shape[0], device=gathered.device).repeat_interleave(m * k)
    mine = torch.arange(offset, offset + b, device=gathered.device)
    return gathered.reshape(-1, w), owner, mine


def contrastive_losses(anchors: torch.Tensor, teacher_hidden: torch.Tensor, positions: torch.Tensor,
                       temperature: float, *, step: bool = True, view: bool = True,
                       group=None, bank: Optional[tuple] = None) -> dict:
    """L_step and/or L_view with their accuracies.

    anchors: (b, M, K, W) projected student states at ``positions``;
    teacher_hidden: (b, M, S, W) teacher middle-layer states (no gradient);
    positions: (b, M, K) sampled positions per sequence;
    bank: ``negative_bank`` of the whole step's batch (the module prepares it
    once per optimizer step, so every micro-batch sees the same negatives),
    with the third entry the global image ids of these b images; None: this
    call's own images form the bank.
    Returns a dict with loss_step/acc_step and/or loss_view/acc_view.
    """
    b, m, k, w = anchors.shape
    teacher_hidden = teacher_hidden.detach()
    t_sampled = gather_at(teacher_hidden.flatten(0, 1), positions.flatten(0, 1)).view(b, m, k, w)
    bank, owner, mine = bank if bank is not None else negative_bank(t_sampled, group)
    # Anchor row (n, m, i) may use bank column q iff q belongs to another image.
    neg_mask = (owner[None, :] != mine[:, None]).repeat_interleave(m * k, dim=0)  # (b*M*K, Q)
    flat_anchors = anchors.reshape(b * m * k, w)
    out = {}
    if step:
        # Positive of (i, j != i): the teacher at sampled position j of the same sequence.
        others = others_index(k, anchors.device)
        pos = t_sampled[:, :, others]  # (b, M, K, K-1, W)
        out["loss_step"], out["acc_step"] = info_nce(
            flat_anchors, pos.reshape(b * m * k, k - 1, w), bank, neg_mask, temperature)
    if view:
        # Positive of (m, p): the teacher at the same position p of every other view m'.
        pos_all = torch.gather(  # [n, m', m, i] = teacher_hidden[n, m', positions[n, m, i]]
            teacher_hidden, 2, positions.reshape(b, 1, m * k, 1).expand(b, m, m * k, w)).view(b, m, m, k, w)
        pos_all = pos_all.permute(0, 2, 3, 1, 4)  # (b, m, i, m', W)
        other_views = others_index(m, anchors.device)
        idx = other_views[None, :, None, :, None].expand(b, m, k, m - 1, w)
        pos = torch.gather(pos_all, 3, idx)  # (b, M, K, M-1, W)
        out["loss_view"], out["acc_view"] = info_nce(
            flat_anchors, pos.reshape(b * m * k, m - 1, w), bank, neg_mask, temperature)
    return out
