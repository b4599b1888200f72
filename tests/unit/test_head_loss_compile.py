"""The chunked head cross-entropy equals the full one; train.compile equals eager."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from star_scale.models.build import build_model
from star_scale.models.gpt import GPT, GPTArgs
from star_scale.models.head_loss import chunked_cross_entropy
from star_scale.objectives.module import build_training_module
from star_scale.train.local_engine import LocalEngine


def test_chunked_cross_entropy_equals_the_full_logits_loss():
    torch.manual_seed(0)
    model = GPT(GPTArgs(layers=1, heads=2, width=32, vocab_size=50, num_classes=3, grid_size=4))
    torch.nn.init.normal_(model.output.weight, std=0.1)
    h = torch.randn(3, 16, 32, requires_grad=True)
    targets = torch.randint(0, 50, (3, 16))
    full = F.cross_entropy(model.output(model.norm(h)).float().reshape(-1, 50), targets.reshape(-1))
    g_full = torch.autograd.grad(full, (h, model.output.weight, model.norm.weight))
    chunked = chunked_cross_entropy(model.norm, model.output, h, targets, chunk_elements=7 * 50)  # 7 rows a chunk
    g_chunked = torch.autograd.grad(chunked, (h, model.output.weight, model.norm.weight))
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert model.head_loss(h, targets).item() == chunked_cross_entropy(model.norm, model.output, h, targets).item()


# Compiled dropout draws from inductor's own RNG stream: equality needs dropout off.
NO_DROPOUT = ["model.token_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0"]


def _losses(tiny_cfg, *overrides, steps=3):
    cfg = tiny_cfg("objective.name=star", "data.global_batch=4", *NO_DROPOUT, *overrides)
    torch.manual_seed(0)
    engine = LocalEngine(build_training_module(cfg, build_model(cfg)), cfg)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 64, (4, 2, 16), generator=g), torch.randint(0, 4, (4,), generator=g))
               for _ in range(steps)]
    return [engine.train_step(*b) for b in batches], engine


def test_compile_equals_eager_on_the_tiny_preset(tiny_cfg, one_thread):
    eager, _ = _losses(tiny_cfg)
    compiled, engine = _losses(tiny_cfg, "train.compile=true")
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in engine.module.student.layers)
    for e, c in zip(eager, compiled):
        for key in ("loss", "loss_ar", "loss_mim", "loss_step", "loss_view", "grad_norm"):
            assert abs(e[key] - c[key]) <= 1e-5 * abs(e[key]), (key, e[key], c[key])
    assert eager[0]["loss"] != eager[-1]["loss"]
