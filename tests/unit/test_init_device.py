"""Initial weights under an ambient device context (``with torch.device(cuda)`` in `bench gpu`).

``GPT.initial_value`` draws with a CPU generator; a tensor it allocates without a device lands on the
ambient device, and CUDA refuses a CPU generator there ("Expected a 'cuda' device type for generator").
A CPU has no second real device, so the tests use the meta device as the ambient one and a mode that
applies CUDA's generator check to every device.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from star_scale.models.gpt import GPT, GPTArgs, initial_value

ARGS = GPTArgs(layers=2, heads=4, width=64, vocab_size=64, num_classes=4, grid_size=4)


class GeneratorDeviceCheck(TorchFunctionMode):
    """Raise, as CUDA does, when a random op fills a tensor on another device than its generator's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        gen = kwargs.get("generator")
        if gen is not None and isinstance(out, torch.Tensor) and out.device.type != gen.device.type:
            raise RuntimeError(f"Expected a '{out.device.type}' device type for generator but found '{gen.device.type}'")
        return out


def test_initial_value_is_drawn_on_the_cpu_under_any_ambient_device():
    name, shape = "layers.0.attention.wqkv.weight", (192, 64)
    plain = initial_value(5, name, shape, 0.02)
    with torch.device("meta"), GeneratorDeviceCheck():
        under = [initial_value(5, n, s, 0.02) for n, s in ((name, shape), ("output.weight", (64, 64)), ("norm.weight", (64,)))]
    assert [t.device.type for t in under] == ["cpu"] * 3
    assert torch.equal(under[0], plain)
    assert torch.all(under[1] == 0) and torch.all(under[2] == 1)


def test_materialize_and_reset_under_another_ambient_device_give_the_cpu_build():
    direct = GPT(ARGS, init_seed=11)
    with torch.device("meta"), GeneratorDeviceCheck():
        lazy = GPT(ARGS, init_seed=11)
        lazy.materialize("cpu")  # a meta value here: "Cannot copy out of meta tensor"
    in_place = GPT(ARGS, init_seed=11)
    with torch.no_grad():
        for p in in_place.parameters():
            p.zero_()
    with torch.device("meta"), GeneratorDeviceCheck():
        in_place.reset_parameters()  # allocated weights, another ambient device: what `bench gpu` does on CUDA
    for model in (lazy, in_place):
        assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), model.state_dict().values()))
