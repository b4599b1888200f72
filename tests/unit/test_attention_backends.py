"""Attention backends: FlexAttention's block mask == SDPA's dense mask on the MIM student, padding of
odd head sizes, the masked-backend switch, and flash-attn's one-time import."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

from star_scale.models import attention
from star_scale.models.gpt import GPT, GPTArgs
from star_scale.objectives.masks import mim_key_mask

TINY = dict(layers=2, heads=4, width=64, vocab_size=64, num_classes=4, grid_size=4,
            class_dropout=0.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch 2.13 refuses FlexAttention backward on CPU up front (``_validate_device``); its eager
    implementation has the backward all the same.  Lifting the guard lets the gradients of our
    block mask be compared here; the compiled CUDA kernel is compared in tests/gpu."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTArgs(**TINY))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the zero head would hide logit differences
    tokens, labels = torch.randint(0, 64, (6, 15)), torch.randint(0, 4, (6,))
    key_mask = mim_key_mask(6, 16, 0.25, scores=torch.rand(6, 15, generator=torch.Generator().manual_seed(1)))
    return model, tokens, labels, key_mask


def _run(model, tokens, labels, key_mask, backend, monkeypatch, grad=True):
    monkeypatch.setenv("STAR_SCALE_MASKED_ATTENTION", backend)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = model(tokens, labels, key_mask=key_mask, return_layers=(1,))
        if grad:
            (out.logits.square().mean() + out.hidden[1].square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()} if grad else {}
    return out.logits.detach(), grads


def test_flex_forward_equals_sdpa_on_the_tiny_preset_with_mim_masks(monkeypatch):
    model, tokens, labels, key_mask = _model_and_batch()
    assert not key_mask.all()
    sdpa, _ = _run(model, tokens, labels, key_mask, "sdpa", monkeypatch, grad=False)
    flex, _ = _run(model, tokens, labels, key_mask, "flex", monkeypatch, grad=False)  # the public API, no guard lifted
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=2e-6)
    unmasked = model(tokens, labels).logits.detach()
    assert (unmasked - sdpa).abs().max() > 1e-3  # the mask does change the output


def test_flex_gradients_equal_sdpa(monkeypatch, flex_backward_on_cpu):
    model, tokens, labels, key_mask = _model_and_batch()
    sdpa, g_sdpa = _run(model, tokens, labels, key_mask, "sdpa", monkeypatch)
    flex, g_flex = _run(model, tokens, labels, key_mask, "flex", monkeypatch)
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=2e-6)
    for name, g in g_sdpa.items():
        torch.testing.assert_close(g_flex[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert max(g.abs().max() for g in g_sdpa.values()) > 1e-3


def test_flex_block_mask_is_the_dense_mask():
    key_mask = mim_key_mask(3, 16, 0.5, scores=torch.rand(3, 15, generator=torch.Generator().manual_seed(2)))
    dense = attention.dense_key_mask(key_mask)[:, 0]
    block = attention.flex_block_mask(key_mask)
    b, q, k = torch.meshgrid(torch.arange(3), torch.arange(16), torch.arange(16), indexing="ij")
    assert torch.equal(block.mask_mod(b, None, q, k), dense)
    assert torch.equal(dense.diagonal(dim1=1, dim2=2), torch.ones(3, 16, dtype=torch.bool))


@pytest.mark.parametrize("head_dim", [100, 12])
def test_padding_odd_head_sizes_leaves_attention_unchanged(head_dim):
    q, k, v = (torch.randn(2, 3, 9, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    plain = attention.sdpa(q, k, v, is_causal=True, pad_to=1)
    padded = attention.sdpa(q, k, v, is_causal=True, pad_to=8)
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-12)
    assert padded.shape[-1] == head_dim
    g1 = torch.autograd.grad(plain.sum(), (q, k, v))
    g2 = torch.autograd.grad(padded.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_masked_backend_is_sdpa_on_cpu_and_a_bad_override_is_named(monkeypatch):
    monkeypatch.delenv("STAR_SCALE_MASKED_ATTENTION", raising=False)
    assert attention.pick_masked(torch.device("cpu"), 16, torch.float32) == "sdpa"
    monkeypatch.setenv("STAR_SCALE_MASKED_ATTENTION", "fast")
    with pytest.raises(ValueError, match="STAR_SCALE_MASKED_ATTENTION='fast': expected auto, sdpa or one of"):
        attention.pick_masked(torch.device("cpu"), 16, torch.float32)


def test_flash_attn_is_imported_once_and_its_failure_logged_once(monkeypatch, caplog):
    import builtins

    attempts = []
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "flash_attn":
            attempts.append(name)
            raise ImportError("undefined symbol: _ZN3c10 (built against another torch)")
        return real_import(name, *args, **kwargs)

    attention.flash_attn_func.cache_clear()
    monkeypatch.setattr(builtins, "__import__", failing_import)
    with caplog.at_level(logging.INFO, logger="star_scale.models.attention"):
        assert attention.flash_attn_func() is None and attention.flash_attn_func() is None
    attention.flash_attn_func.cache_clear()
    assert attempts == ["flash_attn"]
    assert sum("flash-attn unavailable (ImportError: undefined symbol" in r.message for r in caplog.records) == 1
    # On CPU (or fp32) flash-attn is never eligible, whatever is installed.
    assert not attention.flash_attn_eligible(torch.randn(1, 1, 4, 8, dtype=torch.bfloat16))


def test_incremental_decoding_needs_no_mask():
    q, k, v = (torch.randn(2, 2, n, 8) for n in (1, 7, 7))
    torch.testing.assert_close(attention.incremental(q, k, v), attention.sdpa(q, k, v, torch.ones(1, 7, dtype=torch.bool)))
    q = torch.randn(2, 2, 3, 8)
    mask = torch.ones(3, 7, dtype=torch.bool).tril(4)
    torch.testing.assert_close(attention.incremental(q, k, v), attention.sdpa(q, k, v, mask))


def test_the_pick_times_every_candidate_and_drops_the_ones_that_fail(caplog):
    # On CPU SDPA's memory-efficient kernel does not exist: it must drop out, not crash the pick.
    with caplog.at_level(logging.INFO, logger="star_scale.models.attention"):
        pick = attention.measure_masked(torch.device("cpu"), attention.MaskedShape(2, 2, 33, 16), torch.float32)
    assert pick in ("sdpa-math", "flex")
    text = caplog.text
    assert "masked attention sdpa-efficient unavailable for head size 16" in text
    assert "masked attention timings at (2, 2, 33, 16) (ms)" in text and "'sdpa-math'" in text and "'flex'" in text


def test_the_engine_times_the_shape_training_runs(tiny_cfg, monkeypatch):
    """LocalEngine passes the MIM student's real micro-batch shape to the timing (not a stand-in), and the
    timed call receives it; the shape is the one the student's masked forward then runs."""
    from star_scale.models.build import build_model
    from star_scale.objectives.module import build_training_module, masked_attention_shape
    from star_scale.train.local_engine import LocalEngine

    monkeypatch.delenv("STAR_SCALE_MASKED_ATTENTION", raising=False)
    cfg = tiny_cfg("objective.name=star", "data.global_batch=6", "data.micro_batch=3")
    module = build_training_module(cfg, build_model(cfg))
    chosen = []
    real_choose = attention.choose_masked
    monkeypatch.setattr(attention, "choose_masked", lambda device, shape, dtype, timer=None:
                        chosen.append(shape) or real_choose(device, shape, dtype, timer))
    engine = LocalEngine(module, cfg)
    a = module.student.args
    assert chosen == [attention.MaskedShape(3 * 2, a.heads, a.grid_size ** 2, a.head_dim)]  # 3 images x 2 views

    seen = []  # what one micro-batch's masked attention actually gets
    real_attend = attention.KeyMask.attend
    monkeypatch.setattr(attention.KeyMask, "attend", lambda self, q, k, v: seen.append(tuple(q.shape))
                        or real_attend(self, q, k, v))
    tokens, labels = torch.randint(0, 64, (6, 2, a.grid_size ** 2)), torch.randint(0, 4, (6,))
    engine.train_step(tokens, labels)
    assert set(seen) == {tuple(vars(chosen[0]).values())}
    assert masked_attention_shape(build_training_module(tiny_cfg(), build_model(tiny_cfg())), 3) is None  # AR

    timed = []  # on CUDA the candidates are timed at that shape (the timer never touches a device here)
    speed = {"sdpa-efficient": 2.0, "sdpa-math": 3.0, "flex": 1.0}
    pick = attention.choose_masked(torch.device("cuda", 0), chosen[0], torch.bfloat16,
                                   timer=lambda backend, shape, dtype, device: timed.append(shape) or speed[backend])
    assert pick == "flex" and timed == [chosen[0]] * len(attention.MASKED_BACKENDS)


def test_timing_inside_autocast_keeps_an_fp32_reference():
    cpu = torch.device("cpu")
    outside = attention.time_masked("sdpa", 2, 2, 17, 16, torch.float32, cpu, reps=1)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer picks mid-forward, under autocast
        inside = attention.time_masked("sdpa", 2, 2, 17, 16, torch.float32, cpu, reps=1)[1]
    assert inside == outside < 1e-5  # under autocast SDPA would run in bf16: error ~8e-3
