"""The plain-torch InceptionV3 (random weights: shapes, names, loading) and TF1's bilinear resize."""
import numpy as np
import pytest
import torch

from star_scale.evaluate.inception import InceptionV3, load_inception, resize_bilinear_tf1


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return InceptionV3().eval()


def tf1_resize_reference(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear(align_corners=False) written out loop by loop: in = out * (in_size / out_size)."""
    h, w = img.shape
    out = np.zeros((size, size), dtype=np.float32)
    sy, sx = np.float32(h / size), np.float32(w / size)
    for y in range(size):
        iy = np.float32(y) * sy
        y0, y1, dy = int(np.floor(iy)), min(int(np.ceil(iy)), h - 1), iy - np.floor(iy)
        for x in range(size):
            ix = np.float32(x) * sx
            x0, x1, dx = int(np.floor(ix)), min(int(np.ceil(ix)), w - 1), ix - np.floor(ix)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[y, x] = top + (bottom - top) * dy
    return out


def test_tf1_resize_has_no_half_pixel_centres():
    x = torch.tensor([[[[0.0, 1.0]]]]).expand(1, 1, 2, 2)
    out = resize_bilinear_tf1(x, 4)[0, 0, 0]
    assert out.tolist() == [0.0, 0.5, 1.0, 1.0]  # torch's align_corners=False would give 0, .25, .75, 1


@pytest.mark.parametrize("size_in,size_out", [(7, 11), (16, 13), (5, 5)])
def test_tf1_resize_matches_reference(size_in, size_out):
    img = np.random.default_rng(0).uniform(0, 255, (size_in, size_in)).astype(np.float32)
    got = resize_bilinear_tf1(torch.from_numpy(img)[None, None], size_out)[0, 0].numpy()
    np.testing.assert_allclose(got, tf1_resize_reference(img, size_out), rtol=1e-6, atol=1e-4)


def test_feature_shapes_and_spatial_layout(net):
    captured = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = net(images)
    hook.remove()
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 17 * 17 * 7)
    assert out["logits"].shape == (2, 1008)
    # mixed_6/conv's first 7 channels, flattened in TF's (H, W, C) order
    x = captured["x"]
    assert x.shape == (2, 192, 17, 17)
    torch.testing.assert_close(out["spatial"], x[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    # IS logits: pool_3 times the classifier weight, without its bias
    torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.T)


def test_threads_may_share_one_model(net):
    """The demo runs two Inception passes at once on one model: each call's features are its own."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
               for i in range(6)]
    with torch.no_grad():
        alone = [net(b) for b in batches]
        with ThreadPoolExecutor(2) as pool:
            shared = list(pool.map(net, batches))
    for a, b in zip(alone, shared):
        torch.testing.assert_close(b["spatial"], a["spatial"], rtol=0, atol=0)
        torch.testing.assert_close(b["pool"], a["pool"], rtol=0, atol=0)


def test_parameter_names_follow_the_fid_weights_file(net):
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6d.branch1x1.conv.weight"] == (192, 768, 1, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    assert "Mixed_5b.branch_pool.bn.running_var" in shapes
    assert sum(np.prod(s) for k, s in shapes.items() if not k.startswith("fc.") and "bn.running" not in k
               and "num_batches" not in k) == 21_785_568  # torchvision's 27,161,264 minus aux head and 1000-way fc


def test_load_inception_round_trip_and_errors(net, tmp_path):
    path = tmp_path / "inception.pth"
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    loaded = load_inception(path)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    del state["Mixed_6d.branch1x1.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="broken.pth.*Mixed_6d.branch1x1.conv.weight"):
        load_inception(tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        load_inception(tmp_path / "absent.pth")
