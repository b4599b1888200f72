"""What one training step computes: the student (and, for ST-AR, its teacher) and the losses.

Engines (single process here, DeepSpeed/Megatron in parallel/) only call
``module(tokens, labels) -> (loss, metrics)`` and ``module.after_optimizer_step()``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from star_scale.config import Config, ObjectiveConfig
from star_scale.models.attention import MaskedShape
from star_scale.models.gpt import GPT
from star_scale.objectives.contrastive import Projector, contrastive_losses, gather_at, negative_bank
from star_scale.objectives.draws import MASK, POSITIONS
from star_scale.objectives.masks import mim_key_mask, sample_positions
from star_scale.objectives.mim import cosine_similarity, last_layer_features
from star_scale.objectives.teacher import EMATeacher


class ARModule(nn.Module):
    """LlamaGen's baseline: next-token cross-entropy on one view per image."""

    views = 1

    def __init__(self, student: GPT):
        super().__init__()
        self.student = student

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor):
        """tokens: (B, views, T) codes; labels: (B,)."""
        seq = tokens[:, 0]
        last = self.student.args.layers
        out = self.student(seq[:, :-1], labels, return_layers=(last,), logits=False)
        loss = self.student.head_loss(out.hidden[last], seq)  # chunked; TP heads bring their own
        return loss, {"loss_ar": loss.detach()}

    def after_optimizer_step(self) -> None:
        pass


class STARModule(nn.Module):
    """ST-AR: L = L_AR + a * L_MIM + b * (L_step + L_view) / 2 over M = 2 views per image.

    One step, for B images x M views flattened to B*M sequences:

    1. Draw one MIM key mask per sequence (ratio r, ``objective.mask_ratio``;
       never the class column; the diagonal stays visible) when MIM is on.
    2. One student forward over all B*M sequences, with that mask: logits
       (-> L_AR, next-token cross-entropy over every view), the last block's
       output and the middle layer's states (``objective.layer``, default
       depth / 2).  The student is never run twice.
    3. One teacher forward over the same, unmasked sequences, without the
       output head, under no_grad (``EMATeacher``).
    4. L_MIM = mean cosine distance of the last-layer features (``mim.py``).
    5. K positions per sequence (``objective.positions``); the student's
       middle-layer states there go through the projector; L_step / L_view are
       InfoNCE against the teacher's middle-layer states (``contrastive.py``),
       temperature tau (``objective.temperature``), negatives from the other
       images of the global batch (gathered across ``negatives_group``).

    Switches ``objective.mim/step/view`` drop a term from the sum (a disabled
    term counts as 0, so the remaining weights are the same in every ablation
    row, e.g. +MIM+step uses b/2 * L_step).  The teacher is built only if some
    term is on, the projector only if step or view is on.

    Metrics (0-dim tensors): loss_ar and loss_mim/loss_step/loss_view for the
    enabled terms, teacher_cos (mean per-position cosine similarity of the
    student's and teacher's last-layer features; 1 - loss_mim when MIM is on),
    acc_step/acc_view (positive ranked above every negative).

    The teacher sees the true labels (eval mode: no class dropout) while the
    student's labels are dropped for CFG as usual [choice: teacher input is the
    clean, unmasked, undropped sequence].
    """

    views = 2

    def __init__(self, student: GPT, objective: ObjectiveConfig, layer: int):
        super().__init__()
        self.student = student
        self.objective = objective
        self.layer = layer
        self.mim, self.step, self.view = objective.mim, objective.step, objective.view
        self.contrastive = self.step or self.view
        if not 1 <= layer <= student.args.layers:
            raise ValueError(f"contrastive layer {layer}: expected 1..{student.args.layers}")
        self.teacher = EMATeacher(student, objective.ema_decay) if (self.mim or self.contrastive) else None
        self.projector = Projector(student.args.width, objective.projector_hidden) if self.contrastive else None
        # Data-parallel process group the negatives are gathered over (None: the default group).
        self.negatives_group = None
        # Set by the engine per micro-batch (objectives/draws.py): masks and positions then
        # depend on (seed, step, sample), not on the layout; None: the torch RNG.
        self.draws = None
        self.flops_factor = self._flops_factor()

    def _flops_factor(self) -> float:
        """Model FLOPs per token relative to an AR step: + one teacher forward without the head."""
        if self.teacher is None:
            return 1.0
        a = self.student.args
        forward = self.student.flops_per_token(training=False)
        teacher = forward - 2 * a.width * a.vocab_size
        return 1.0 + teacher / (3 * forward)

    def losses(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[dict, dict]:
        """(terms with their graphs: loss_ar, loss_mim, loss_step, loss_view as enabled; detached extras)."""
        b, m, t = tokens.shape
        if m != self.views:
            raise ValueError(f"ST-AR expects {self.views} views per image, got tokens of shape {tuple(tokens.shape)}")
        o, dev = self.objective, tokens.device
        seq = tokens.reshape(b * m, t)
        lab = labels.repeat_interleave(m)
        inp, s = seq[:, :-1], t  # student/teacher sequence: class + T-1 tokens = T positions
        last = self.student.args.layers
        layers = (last, self.layer) if self.contrastive else (last,)

        draws = self.draws
        key_mask = None
        if self.mim:
            scores = draws.uniform(MASK, b, m, s - 1, dev) if draws else None
            key_mask = mim_key_mask(b * m, s, o.mask_ratio, device=dev, scores=scores)
        out = self.student(inp, lab, key_mask=key_mask, return_layers=layers, logits=False)
        terms = {"loss_ar": self.student.head_loss(out.hidden[last], seq)}
        extras: dict = {}
        if self.teacher is None:
            return terms, extras
        batch = self._batch_rows(b)  # teacher outputs and negatives prepared for the whole step, or None
        teacher_hidden = batch["hidden"] if batch else self.teacher(inp, lab, return_layers=layers).hidden

        with torch.no_grad():
            ft = last_layer_features(self.teacher.model, teacher_hidden[last], o.mim_features)
        if self.mim:
            cos = cosine_similarity(last_layer_features(self.student, out.hidden[last], o.mim_features), ft)
            terms["loss_mim"] = (1.0 - cos).mean()
            extras["teacher_cos"] = cos.detach().mean()
        else:
            with torch.no_grad():
                fs = last_layer_features(self.student, out.hidden[last], o.mim_features)
                extras["teacher_cos"] = cosine_similarity(fs, ft).mean()

        if self.contrastive:
            k, w = o.positions, self.student.args.width
            scores = draws.uniform(POSITIONS, b, m, s - 1, dev) if draws else None
            pos = sample_positions(b * m, s, k, device=dev, scores=scores)
            anchors = self.projector(gather_at(out.hidden[self.layer], pos)).view(b, m, k, w)
            c = contrastive_losses(anchors, teacher_hidden[self.layer].view(b, m, s, w), pos.view(b, m, k),
                                   o.temperature, step=self.step, view=self.view, group=self.negatives_group,
                                   bank=batch["bank"] if batch else None)
            for name in ("step", "view"):
                if f"loss_{name}" in c:
                    terms[f"loss_{name}"] = c[f"loss_{name}"]
                    extras[f"acc_{name}"] = c[f"acc_{name}"]
        return terms, extras

    def combine(self, terms: dict) -> torch.Tensor:
        """L_AR + a * L_MIM + b * (L_step + L_view) / 2, missing terms counting 0."""
        o = self.objective
        loss = terms["loss_ar"]
        if "loss_mim" in terms:
            loss = loss + o.mim_weight * terms["loss_mim"]
        contrastive = [terms[k] for k in ("loss_step", "loss_view") if k in terms]
        if contrastive:
            loss = loss + o.contrastive_weight * sum(contrastive) / 2
        return loss

    def begin_step(self, tokens: torch.Tensor, labels: torch.Tensor, micro_batch: int) -> None:
        """Before the micro-batches of one optimizer step: the teacher over this rank's whole batch, once.

        Its sampled features, gathered over the data-parallel ranks, are every
        micro-batch's negatives: those of the whole global batch, so gradient
        accumulation does not change the objective (1 x 32 and 2 x 16 give the
        same loss and gradients). The micro-batches reuse these teacher outputs
        instead of running the teacher again: the same teacher FLOPs, at the
        cost of holding two layers of teacher states for the rank's batch.
        Needs the engine's draws for the batch's first image (set_step_draws).
        """
        self._batch = None
        if self.teacher is None or self.draws is None:
            return
        b, m, t = tokens.shape
        last = self.student.args.layers
        layers = (last, self.layer) if self.contrastive else (last,)
        parts = {layer: [] for layer in layers}
        for start in range(0, b, micro_batch):
            seq = tokens[start:start + micro_batch].reshape(-1, t)
            out = self.teacher(seq[:, :-1], labels[start:start + micro_batch].repeat_interleave(m), return_layers=layers)
            for layer in layers:
                parts[layer].append(out.hidden[layer])
        hidden = {layer: torch.cat(v) for layer, v in parts.items()}
        bank = None
        if self.contrastive:
            k, w = self.objective.positions, self.student.args.width
            scores = self.draws.uniform(POSITIONS, b, m, t - 1, tokens.device)
            pos = sample_positions(b * m, t, k, device=tokens.device, scores=scores)
            bank = negative_bank(gather_at(hidden[self.layer], pos).view(b, m, k, w), self.negatives_group)
        self._batch = {"first": self.draws.first, "images": b, "views": m, "hidden": hidden, "bank": bank}

    def end_step(self) -> None:
        self._batch = None

    def _batch_rows(self, images: int):
        """The prepared step's teacher states and negatives for the current micro-batch, or None."""
        batch = getattr(self, "_batch", None)
        if batch is None or self.draws is None:
            return None
        i = self.draws.first - batch["first"]
        if not 0 <= i <= batch["images"] - images:
            raise RuntimeError(f"micro-batch of images {self.draws.first}..+{images} is outside the prepared step")
        m = batch["views"]
        rows = slice(i * m, (i + images) * m)
        bank = batch["bank"]
        return {"hidden": {layer: h[rows] for layer, h in batch["hidden"].items()},
                "bank": None if bank is None else (bank[0], bank[1], bank[2][i:i + images])}

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor):
        """tokens: (B, 2, T) codes (two crops per image); labels: (B,)."""
        terms, extras = self.losses(tokens, labels)
        loss = self.combine(terms)
        metrics = {k: v.detach() for k, v in terms.items()}
        metrics.update(extras)
        return loss, metrics

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            self.teacher.update(self.student)

    def take_teacher(self):
        """Remove the EMA teacher from the submodules and return it (a sharding engine holds it instead)."""
        return self._modules.pop("teacher", None)

    def use_teacher(self, teacher) -> None:
        """Use an engine-held teacher (same call, ``.model``, ``.update``, ``.copy_from``).

        A plain attribute, not a submodule: the student's engine neither partitions,
        optimises nor checkpoints it; the teacher's engine does that itself.
        """
        self.__dict__["teacher"] = teacher

    def reset_teacher(self) -> None:
        """Copy the student's current weights into the teacher (call after loading pretrained student weights)."""
        if self.teacher is not None:
            self.teacher.copy_from(self.student)


def masked_attention_shape(module: nn.Module, micro_batch: int, tp: int = 1) -> Optional[MaskedShape]:
    """The student's key-masked attention in one micro-batch of ``micro_batch`` images (None: nothing runs masked).

    ST-AR's MIM student runs every view of the micro-batch's images at once over class + T-1 tokens, with
    the heads of one tensor-parallel rank.
    """
    if not getattr(module, "mim", False):
        return None
    a = module.student.args
    return MaskedShape(micro_batch * module.views, a.heads // tp, a.seq_len - 1, a.head_dim)


def build_training_module(cfg: Config, student: GPT) -> nn.Module:
    if cfg.objective.name == "ar":
        return ARModule(student)
    if cfg.objective.name == "star":
        return STARModule(student, cfg.objective, cfg.contrastive_layer())
    raise ValueError(f"objective.name={cfg.objective.name!r}: expected 'ar' or 'star'")
