"""STARModule end to end: AR bit-identity, switches, gradients, a short run, the step benchmark."""
import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from star_scale.bench import step as bench_step
from star_scale.config import Config, ConfigError, load_config
from star_scale.models.build import build_model
from star_scale.objectives.ar import next_token_loss
from star_scale.objectives.module import ARModule, STARModule, build_training_module
from star_scale.train.local_engine import LocalEngine, param_groups

V, C, GRID = 16, 4, 4
T = GRID * GRID


def make_cfg(name="star", dropout=None, batch=8, **objective) -> Config:
    cfg = Config()
    cfg.model.layers, cfg.model.heads, cfg.model.width = 2, 2, 32
    cfg.model.vocab_size, cfg.model.num_classes, cfg.model.grid_size = V, C, GRID
    if dropout is not None:
        for k in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout"):
            setattr(cfg.model, k, dropout)
    cfg.objective.name = name
    for k, v in objective.items():
        setattr(cfg.objective, k, v)
    cfg.train.device = "cpu"
    cfg.data.global_batch = batch
    cfg.optimizer.lr_batch = None
    cfg.optimizer.lr = 1e-3
    return cfg.validate()


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_training_module(cfg, build_model(cfg))


def random_batch(b=8, views=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, views, T), generator=g), torch.randint(0, C, (b,), generator=g)


# ---- objective: ar is the plain baseline --------------------------------------
def test_ar_builds_nothing_extra():
    module = build(make_cfg("ar"))
    assert type(module) is ARModule and module.views == 1
    assert all(k.startswith("student.") for k in module.state_dict())
    assert getattr(module, "flops_factor", 1.0) == 1.0
    assert not hasattr(module, "teacher") and not hasattr(module, "projector")


def test_ar_training_is_plain_training_bit_for_bit():
    cfg = make_cfg("ar", batch=4)
    tokens, labels = random_batch(4, views=1)
    # Through the training module and the engine.
    torch.manual_seed(0)
    model_a = build_model(cfg)
    engine = LocalEngine(build_training_module(cfg, model_a), cfg)
    losses_a = [engine.train_step(tokens, labels)["loss"] for _ in range(3)]
    # A hand-written LlamaGen loop: forward, cross-entropy, clip, AdamW.
    torch.manual_seed(0)
    model_b = build_model(cfg)
    o = cfg.optimizer
    opt = torch.optim.AdamW(param_groups(model_b, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            foreach=True)
    losses_b = []
    for _ in range(3):
        model_b.train()
        opt.zero_grad(set_to_none=True)
        seq = tokens[:, 0]
        logits = model_b(seq[:, :-1], labels).logits
        loss = F.cross_entropy(logits.reshape(-1, V).float(), seq.reshape(-1))
        (loss * 1.0).backward()
        torch.nn.utils.clip_grad_norm_(list(model_b.parameters()), o.grad_clip)
        opt.step()
        losses_b.append(float(loss.detach()))
    assert losses_a == losses_b
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), n


# ---- ST-AR module ----------------------------------------------------------------
SWITCHES = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("mim,step,view", SWITCHES)
def test_switches_build_and_log_only_what_is_on(mim, step, view):
    module = build(make_cfg(mim=mim, step=step, view=view))
    assert isinstance(module, STARModule) and module.views == 2
    any_on = mim or step or view
    assert (module.teacher is not None) == any_on
    assert (module.projector is not None) == (step or view)
    module.train()
    loss, metrics = module(*random_batch())
    expected = {"loss_ar"}
    if any_on:
        expected.add("teacher_cos")
    if mim:
        expected.add("loss_mim")
    for name, on in (("step", step), ("view", view)):
        if on:
            expected |= {f"loss_{name}", f"acc_{name}"}
    assert set(metrics) == expected
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    o = module.objective
    total = metrics["loss_ar"] + o.mim_weight * metrics.get("loss_mim", 0.0) + \
        o.contrastive_weight * (metrics.get("loss_step", 0.0) + metrics.get("loss_view", 0.0)) / 2
    assert loss.item() == pytest.approx(float(total), rel=1e-6)
    if mim:
        assert metrics["teacher_cos"].item() == pytest.approx(1 - metrics["loss_mim"].item(), abs=1e-6)
    if any_on:
        assert 1.0 < module.flops_factor <= 4 / 3  # one teacher forward without the head
    else:
        assert module.flops_factor == 1.0


def test_star_ar_loss_over_all_views_r0_is_plain_forward():
    module = build(make_cfg(dropout=0.0, mask_ratio=0.0))
    tokens, labels = random_batch()
    terms, _ = module.losses(tokens, labels)
    seq = tokens.reshape(-1, T)
    plain = module.student(seq[:, :-1], labels.repeat_interleave(2))
    assert torch.equal(terms["loss_ar"], next_token_loss(plain.logits, seq))
    # With masking on, the same student pass gives a different (masked) L_AR.
    masked = build(make_cfg(dropout=0.0, mask_ratio=0.5))
    torch.nn.init.normal_(masked.student.output.weight, std=0.02)
    torch.nn.init.normal_(module.student.output.weight, std=0.02)
    assert masked.losses(tokens, labels)[0]["loss_ar"] != module.losses(tokens, labels)[0]["loss_ar"]


def test_student_runs_once_teacher_without_logits(monkeypatch):
    module = build(make_cfg())
    calls = {"student": [], "teacher": []}
    s_fwd, t_fwd = module.student.forward, module.teacher.model.forward

    def spy(name, fwd):
        def inner(*a, **kw):
            calls[name].append(kw)
            return fwd(*a, **kw)
        return inner

    monkeypatch.setattr(module.student, "forward", spy("student", s_fwd))
    monkeypatch.setattr(module.teacher.model, "forward", spy("teacher", t_fwd))
    module(*random_batch())
    assert len(calls["student"]) == 1 and calls["student"][0]["key_mask"] is not None
    assert len(calls["teacher"]) == 1 and calls["teacher"][0]["logits"] is False
    assert calls["teacher"][0].get("key_mask") is None


def test_views_must_be_two():
    module = build(make_cfg())
    with pytest.raises(ValueError, match="views"):
        module(*random_batch(views=1))


def test_gradients_teacher_none_projector_and_student_from_every_term():
    module = build(make_cfg(dropout=0.0))
    torch.nn.init.normal_(module.student.output.weight, std=0.02)  # zero head would block L_AR's body gradient
    module.train()
    tokens, labels = random_batch()
    torch.manual_seed(1)
    terms, _ = module.losses(tokens, labels)
    assert set(terms) == {"loss_ar", "loss_mim", "loss_step", "loss_view"}
    student = [p for p in module.student.parameters()]
    names = [n for n, _ in module.student.named_parameters()]
    for name, term in terms.items():
        grads = torch.autograd.grad(term, student, retain_graph=True, allow_unused=True)
        flowing = {n for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
        assert "tok_embeddings.weight" in flowing, name  # reaches the bottom of the student
        assert "layers.0.attention.wqkv.weight" in flowing, name
    for name in ("loss_step", "loss_view"):
        grads = torch.autograd.grad(terms[name], list(module.projector.parameters()), retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)
    module.combine(terms).backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.projector.parameters())


def test_teacher_sees_unmasked_input_and_student_masked():
    # The teacher's features equal an unmasked forward of the same weights.
    module = build(make_cfg(dropout=0.0, mim_features="block"))
    module.train()
    tokens, labels = random_batch()
    seq = tokens.reshape(-1, T)
    with torch.no_grad():
        ref = module.teacher.model(seq[:, :-1], labels.repeat_interleave(2), return_layers=(2,), logits=False)
        s_plain = module.student(seq[:, :-1], labels.repeat_interleave(2), return_layers=(2,), logits=False)
    # Teacher == student weights at init, so a plain student forward gives teacher_cos 1 exactly ...
    assert torch.allclose(ref.hidden[2], s_plain.hidden[2])
    _, metrics = module(tokens, labels)
    # ... and the masked student does not.
    assert metrics["teacher_cos"] < 1 - 1e-4


# ---- a short CPU run ----------------------------------------------------------------
def _structured_batch(g, base, b=16):
    """Per-class 4x4 patterns, each view rolled by 0/1 column and 10% token noise."""
    labels = torch.randint(0, C, (b,), generator=g)
    views = []
    for _ in range(2):
        img = base[labels]
        shift = torch.randint(0, 2, (b,), generator=g)
        img = torch.stack([torch.roll(im, int(s), dims=1) for im, s in zip(img, shift)])
        noise = torch.rand(b, GRID, GRID, generator=g) < 0.1
        img = torch.where(noise, torch.randint(0, V, (b, GRID, GRID), generator=g), img)
        views.append(img.flatten(1))
    return torch.stack(views, 1), labels


def test_short_star_run_lowers_every_loss_term():
    """ST-AR on a briefly AR-trained student (so masking matters): every term goes down.

    From a random init the student equals the teacher and its features hardly
    depend on context, so L_MIM starts near 0 and can only grow while the AR
    loss makes features context-dependent; starting from an AR-trained student
    is the fair test that the MIM gradient pulls the masked student toward the
    teacher.
    """
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, V, (C, GRID, GRID), generator=g)
    ar_cfg = make_cfg("ar", dropout=0.0, batch=16)
    star_cfg = make_cfg("star", dropout=0.0, batch=16, ema_decay=0.9)
    torch.manual_seed(0)
    model = build_model(ar_cfg)
    ar = LocalEngine(build_training_module(ar_cfg, model), ar_cfg)
    for _ in range(100):
        tokens, labels = _structured_batch(g, base)
        ar.train_step(tokens[:, :1], labels)
    module = build_training_module(star_cfg, model)
    engine = LocalEngine(module, star_cfg)
    history = []
    for _ in range(60):
        history.append(engine.train_step(*_structured_batch(g, base)))
    for key in ("loss_ar", "loss_mim", "loss_step", "loss_view", "loss"):
        first = sum(h[key] for h in history[:10]) / 10
        last = sum(h[key] for h in history[-10:]) / 10
        assert last < first, (key, first, last)


# ---- config -------------------------------------------------------------------------
def test_config_keys_and_validation():
    cfg = load_config(overrides=["objective=star", "objective.mim_features=block", "objective.projector_hidden=64"])
    assert cfg.objective.name == "star" and cfg.objective.mim_features == "block"
    assert build_training_module(cfg, build_model(cfg)).projector.fc1.out_features == 64
    with pytest.raises(ConfigError, match="mim_features"):
        load_config(overrides=["objective.mim_features=final"])
    with pytest.raises(ConfigError, match="positions"):
        load_config(overrides=["objective=star", "model.grid_size=2", "objective.positions=4"])
    with pytest.raises(ConfigError, match="projector_hidden"):
        load_config(overrides=["objective.projector_hidden=0"])
    assert Config().objective.mim_features == "norm" and Config().objective.projector_hidden is None


# ---- bench step ---------------------------------------------------------------------
def test_bench_step_help():
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--help"])
    assert e.value.code == 0


def test_bench_step_runs_and_prints_ratio_last(capsys, monkeypatch):
    monkeypatch.setitem(bench_step.CONFIGS, "micro", (1, 2, 32, 1))
    assert bench_step.main(["--configs", "micro", "--reps", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"ratio star/ar = \d+\.\d{3}", lines[-1])
    assert any(line.strip().startswith("ar ") for line in lines) and any("star (" in line for line in lines)


def test_bench_step_rope_prints_its_ratio_last_and_restores_the_eager_form(capsys, monkeypatch):
    from star_scale.models import gpt

    eager = gpt.apply_rope
    monkeypatch.setitem(bench_step.CONFIGS, "micro", (1, 2, 32, 1))
    assert bench_step.main(["--rope", "--configs", "micro", "--reps", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"ratio rope-complex/real = \d+\.\d{3}", lines[-1])
    assert lines[0].startswith("micro: star, cpu, median of 1: RoPE complex ")
    assert gpt.apply_rope is eager
