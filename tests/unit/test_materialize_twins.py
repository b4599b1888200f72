"""A meta-built student and its EMA teacher copy are allocated together: one draw per weight for both,
the same values as a whole build, and only true copies may share the pass."""
import collections

import pytest
import torch

from star_scale.models import gpt as gpt_module
from star_scale.models.build import materialize
from star_scale.models.gpt import GPT, GPTArgs
from star_scale.objectives.teacher import EMATeacher

ARGS = GPTArgs(layers=2, heads=4, width=64, vocab_size=64, num_classes=4, grid_size=4)


class StudentAndTeacher(torch.nn.Module):  # the shape of the training module: a GPT and an EMA copy of it
    def __init__(self, student: GPT):
        super().__init__()
        self.student, self.teacher = student, EMATeacher(student)


def test_student_and_teacher_draw_each_weight_once_and_equal_a_whole_build(monkeypatch):
    torch.manual_seed(0)
    whole = GPT(ARGS)
    torch.manual_seed(0)
    with torch.device("meta"):
        module = StudentAndTeacher(GPT(ARGS))
    draws = collections.Counter()
    draw = gpt_module.initial_value

    def counted(seed, name, shape, std):
        draws[name] += 1
        return draw(seed, name, shape, std)
    monkeypatch.setattr(gpt_module, "initial_value", counted)
    order = []
    materialize(module, "cpu", after_unit=lambda unit: order.append(sum(p.numel() for p in unit.parameters())))
    names = [n for n, _ in whole.named_parameters()]
    assert sorted(draws) == sorted(names) and set(draws.values()) == {1}
    assert len(order) == 2 * len(whole.units()) and order[0::2] == order[1::2]  # unit by unit, in step
    for gpt in (module.student, module.teacher.model):
        assert not gpt.is_meta() and torch.equal(gpt.rope, whole.rope)
        got = dict(gpt.named_parameters())
        assert all(torch.equal(got[n], p) for n, p in whole.named_parameters())
    assert not any(p.requires_grad for p in module.teacher.model.parameters())


def test_a_gpt_of_another_seed_is_not_a_twin():
    with torch.device("meta"):
        a, b = GPT(ARGS, init_seed=1), GPT(ARGS, init_seed=2)
    with pytest.raises(ValueError, match="materialize twins must be copies of the GPT"):
        a.materialize("cpu", twins=[(b, None)])
    with torch.device("meta"):
        a, b = GPT(ARGS, init_seed=1), GPT(ARGS, init_seed=2)
    materialize([a, b], "cpu")  # grouped apart: each its own values
    assert torch.equal(dict(a.named_parameters())["layers.0.attention.wqkv.weight"],
                       gpt_module.initial_value(1, "layers.0.attention.wqkv.weight", (192, 64), ARGS.init_std))
    assert not torch.equal(dict(a.named_parameters())["layers.0.attention.wqkv.weight"],
                           dict(b.named_parameters())["layers.0.attention.wqkv.weight"])
