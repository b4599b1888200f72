"""One ST-AR objective whatever the gradient accumulation: negatives span the whole step's batch.

1 x 32 and 2 x 16 (and 4 x 8) on one process must give the same losses and the
same accumulated gradients (lr = 0 keeps the gradients after the step).
"""
import pytest
import torch

from star_scale.train.local_engine import LocalEngine
from tests.unit.test_star import build, make_cfg, random_batch

TOL = 1e-6  # fp32: only summation order differs between the layouts


def step(micro, module_hook=None, **objective):
    cfg = make_cfg(batch=32, dropout=0.0, positions=4, mask_ratio=0.25, **objective)
    cfg.optimizer.lr = 0.0
    cfg.data.micro_batch = micro
    module = build(cfg)
    if module_hook:
        module_hook(module)
    engine = LocalEngine(module, cfg)
    metrics = engine.train_step(*random_batch(b=32))
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return metrics, grads


def assert_same(a, b):
    (ma, ga), (mb, gb) = a, b
    for k in ("loss", "loss_ar", "loss_mim", "loss_step", "loss_view"):
        assert abs(ma[k] - mb[k]) <= TOL * max(1.0, abs(ma[k])), (k, ma[k], mb[k])
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=TOL, rtol=1e-5, msg=n)


@pytest.mark.parametrize("micro", [16, 8])
def test_accumulation_gives_the_same_star_loss_and_gradients(one_thread, micro):
    assert_same(step(None), step(micro))


def test_per_micro_batch_negatives_would_change_the_objective(one_thread):
    """The check can fail: without the step-wide bank, 2 x 16 sees half the negatives and its loss differs."""
    def per_micro_batch(module):
        module.begin_step = lambda *a, **k: None

    whole, split = step(None), step(16, per_micro_batch)
    assert abs(whole[0]["loss_view"] - split[0]["loss_view"]) > 1e-3


def test_teacher_runs_once_per_micro_batch_in_either_layout(one_thread, monkeypatch):
    calls = []

    def count(module):
        forward = module.teacher.model.forward
        module.teacher.model.forward = lambda *a, **k: calls.append(a[0].shape[0]) or forward(*a, **k)

    step(16, count)
    assert calls == [32, 32]  # 2 micro-batches x 16 images x 2 views: no second teacher pass
