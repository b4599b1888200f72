"""Single-process engine: optimizer, one training step, state for checkpoints.

The DeepSpeed engine (star_scale/parallel/) offers the same methods, so the
trainer never knows which one it drives.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from star_scale.config import Config
from star_scale.models import attention
from star_scale.models.build import materialize
from star_scale.objectives.draws import begin_step, end_step, set_step_draws
from star_scale.objectives.module import masked_attention_shape
from star_scale.train.metrics import accumulate, read_metrics

log = logging.getLogger(__name__)


def effective_lr(cfg: Config) -> float:
    o = cfg.optimizer
    return o.lr * cfg.data.global_batch / o.lr_batch if o.lr_batch else o.lr


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on matrices and embeddings (>= 2 dims), as LlamaGen."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(module: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optimizer
    # Fused AdamW on CUDA; foreach elsewhere (fused CPU kernels are slower here).
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    log.info("optimizer: torch AdamW (%s), lr %.3g", "fused" if "fused" in kwargs else "foreach", effective_lr(cfg))
    return torch.optim.AdamW(param_groups(module, o.weight_decay), lr=effective_lr(cfg),
                             betas=tuple(o.betas), eps=o.eps, **kwargs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def configure_models(module: nn.Module, cfg: Config) -> None:
    """Every GPT of the module (student, teacher copy): activation checkpointing, ``train.compile``."""
    for m in module.modules():
        if hasattr(m, "activation_checkpointing"):  # recompute blocks in backward instead of keeping activations
            m.activation_checkpointing = cfg.parallel.activation_checkpointing
            if cfg.train.compile:
                m.compile_blocks()


class LocalEngine:
    """One process, one device: AdamW, bf16 autocast on GPU, micro-batch accumulation, clipping."""

    def __init__(self, module: nn.Module, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.dtype = resolve_dtype(cfg.train.precision, self.device)
        materialize(module, self.device)  # a GPT built on the meta device (the trainer's) is allocated here
        self.module = module.to(self.device)
        configure_models(module, cfg)
        self.optimizer = make_optimizer(module, cfg, self.device)
        self.micro_batch = cfg.data.micro_batch or cfg.data.global_batch
        shape = masked_attention_shape(module, self.micro_batch)
        if shape is not None:  # timed at the shape training runs, not at a stand-in
            attention.use_masked(self.device, shape.head_dim, self.dtype,
                                 attention.choose_masked(self.device, shape, self.dtype))
        self.dp_rank, self.dp_size, self.tp_size, self.is_main = 0, 1, 1, True
        self.step = 0  # optimizer steps taken: seeds ST-AR's per-step draws

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
        """One optimizer step; metrics as floats (reads the device: use ``train_step_lazy`` in loops)."""
        return read_metrics(self.train_step_lazy(tokens, labels))

    def train_step_lazy(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
        """One optimizer step; metrics as 0-dim device tensors (no host-device sync), lr a float."""
        self.module.train()
        tokens, labels = tokens.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        n = tokens.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict = {}
        set_step_draws(self.module, self.cfg.train.seed, self.step, 0, n)
        with self.autocast():
            begin_step(self.module, tokens, labels, self.micro_batch)
        for start in range(0, n, self.micro_batch):
            sl = slice(start, start + self.micro_batch)
            weight = (min(n, start + self.micro_batch) - start) / n
            set_step_draws(self.module, self.cfg.train.seed, self.step, start, n)
            with self.autocast():
                loss, metrics = self.module(tokens[sl], labels[sl])
            (loss * weight).backward()
            accumulate(totals, {**metrics, "loss": loss}, weight)
        end_step(self.module)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.grad_clip)
        self.optimizer.step()
        self.module.after_optimizer_step()
        self.step += 1
        totals["grad_norm"] = grad_norm.detach()
        totals["lr"] = self.optimizer.param_groups[0]["lr"]
        return totals

    def save_checkpoint(self, ckpts, step: int, trainer_state: dict, wait: bool = False) -> None:
        """One process writes everything, synchronously (a distributed engine coordinates its ranks instead)."""
        ckpts.save(step, {"engine": self.state_dict(), "trainer": trainer_state})

    def poll_checkpoint(self) -> None:
        pass  # saves are synchronous

    def wait_checkpoint(self) -> None:
        pass

    def load_checkpoint(self, ckpts):
        """Restore from the newest whole checkpoint: (step, trainer state), or None.

        Distributed checkpoints (any world or TP size) load through their shards, assembled.
        """
        from star_scale.parallel.consolidated import load_latest_local  # torch only, no DeepSpeed

        latest = load_latest_local(self, ckpts)
        if latest is not None:
            self.step = latest[0]
        return latest

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
