"""The EMA teacher: closed-form EMA, weights only, eval mode, no gradients, saved with the module."""
import pytest
import torch
import torch.nn as nn

from star_scale.config import Config
from star_scale.models.build import build_model
from star_scale.objectives.module import STARModule, build_training_module
from star_scale.objectives.teacher import EMATeacher, ema_update_
from star_scale.train.local_engine import LocalEngine


def small_cfg(**objective) -> Config:
    cfg = Config()
    cfg.model.layers, cfg.model.heads, cfg.model.width = 2, 2, 32
    cfg.model.vocab_size, cfg.model.num_classes, cfg.model.grid_size = 32, 4, 4
    cfg.objective.name = "star"
    for k, v in objective.items():
        setattr(cfg.objective, k, v)
    cfg.train.device = "cpu"
    cfg.data.global_batch = 4
    cfg.optimizer.lr_batch = None
    cfg.optimizer.lr = 1e-3
    return cfg.validate()


def star_module(**objective) -> STARModule:
    cfg = small_cfg(**objective)
    torch.manual_seed(0)
    return build_training_module(cfg, build_model(cfg))


class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("d,n", [(0.9, 7), (0.9999, 12), (0.0, 3), (1.0, 3)])
def test_ema_closed_form_with_scripted_student(d, n):
    torch.manual_seed(0)
    student = Scripted()
    teacher = EMATeacher(student, d)
    init = [p.detach().clone() for p in teacher.model.parameters()]
    history = []
    for _ in range(n):
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn_like(p))
        history.append([p.detach().clone() for p in student.parameters()])
        teacher.update(student)
    for idx, p in enumerate(teacher.model.parameters()):
        # teacher_n = d^n * init + (1 - d) * sum_k d^(n-k) * s_k
        expected = d**n * init[idx] + sum((1 - d) * d ** (n - k) * history[k - 1][idx] for k in range(1, n + 1))
        torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-12)


def test_ema_update_on_shards():
    # Works on any matching tensor lists, e.g. the local partitions of a sharded model.
    t = [torch.zeros(5), torch.ones(2, 2)]
    s = [torch.full((5,), 2.0), torch.full((2, 2), 3.0)]
    ema_update_(t, s, 0.75)
    assert torch.allclose(t[0], torch.full((5,), 0.5)) and torch.allclose(t[1], torch.full((2, 2), 1.5))
    with pytest.raises(ValueError):
        ema_update_(t, s[:1], 0.5)


def test_teacher_is_weights_only_eval_and_frozen():
    module = star_module()
    teacher = module.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    module.train()
    assert module.student.training and not teacher.training and not teacher.model.training
    assert all(not m.training for m in teacher.modules())
    # Same architecture and initial weights as the student.
    for (n1, p1), (n2, p2) in zip(teacher.model.named_parameters(), module.student.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    # A training step: no grad reaches the teacher, the optimizer holds no teacher tensor.
    engine = LocalEngine(module, small_cfg())
    tokens, labels = torch.randint(0, 32, (4, 2, 16)), torch.randint(0, 4, (4,))
    engine.train_step(tokens, labels)
    assert all(p.grad is None for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    opt_params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    assert not teacher_ids & {id(p) for p in opt_params}
    assert not teacher_ids & {id(p) for p in engine.optimizer.state}
    student_and_projector = sum(p.numel() for p in module.student.parameters()) + \
        sum(p.numel() for p in module.projector.parameters())
    assert sum(p.numel() for p in opt_params) == student_and_projector
    # Teacher memory: its weights (and the model's constant rope buffer), nothing else.
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in module.student.parameters())


def test_engine_step_updates_teacher_once():
    module = star_module(ema_decay=0.5)
    init = {n: p.detach().clone() for n, p in module.teacher.model.named_parameters()}
    engine = LocalEngine(module, small_cfg(ema_decay=0.5))
    engine.train_step(torch.randint(0, 32, (4, 2, 16)), torch.randint(0, 4, (4,)))
    for n, p in module.teacher.model.named_parameters():
        s = dict(module.student.named_parameters())[n]
        torch.testing.assert_close(p, 0.5 * init[n] + 0.5 * s.detach())
    assert not torch.equal(module.teacher.model.tok_embeddings.weight, init["tok_embeddings.weight"])


def test_teacher_forward_has_no_logits_and_no_graph():
    module = star_module()
    out = module.teacher(torch.randint(0, 32, (2, 15)), torch.tensor([0, 1]), return_layers=(1, 2))
    assert out.logits is None
    assert all(not h.requires_grad for h in out.hidden.values())


def test_teacher_saved_and_loaded_with_module_state_dict():
    module = star_module(ema_decay=0.0)
    keys = module.state_dict().keys()
    assert any(k.startswith("teacher.model.") for k in keys)
    assert any(k.startswith("projector.") for k in keys)
    with torch.no_grad():
        module.student.tok_embeddings.weight.add_(1.0)
    module.after_optimizer_step()  # d = 0: teacher copies the student
    state = {k: v.clone() for k, v in module.state_dict().items()}
    other = star_module(ema_decay=0.0)
    assert not torch.equal(other.teacher.model.tok_embeddings.weight, module.teacher.model.tok_embeddings.weight)
    other.load_state_dict(state)
    assert torch.equal(other.teacher.model.tok_embeddings.weight, module.teacher.model.tok_embeddings.weight)
    assert not any(p.requires_grad for p in other.teacher.parameters())


def test_reset_teacher_copies_student():
    module = star_module()
    with torch.no_grad():
        for p in module.student.parameters():
            p.mul_(2.0).add_(0.1)
    module.reset_teacher()
    for p, q in zip(module.teacher.model.parameters(), module.student.parameters()):
        assert torch.equal(p, q)
