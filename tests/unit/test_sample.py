"""Sampling pieces in one process: per-sample noise, labels, the grid, batch files, resume and rank splits."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from star_scale.evaluate.sample import (
    SampleSettings,
    batch_file,
    batches_of_rank,
    make_labels,
    sample_noise,
    sample_to_npz,
    save_grid,
)
from star_scale.models.generate import generate, inverse_cdf_sample
from star_scale.models.gpt import GPT, GPTArgs
from star_scale.tokenizer import PatchTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTArgs(layers=2, heads=2, width=32, vocab_size=64, num_classes=4, grid_size=4, ffn_multiple_of=32))
    torch.nn.init.normal_(m.output.weight, std=0.5)  # non-uniform predictions
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(1)
    return PatchTokenizer(torch.rand(64, 48), image_size=16, patch=4)  # 4x4 grid of 4x4 patches


def test_inverse_cdf_sampling_boundaries_and_zero_mass():
    probs = torch.tensor([[0.125, 0.0, 0.5, 0.375]]).expand(6, 4)  # exact in binary: cdf 1/8, 1/8, 5/8, 1
    u = torch.tensor([0.0, 0.0625, 0.125, 0.6, 0.625, 0.999])
    assert inverse_cdf_sample(probs, u).tolist() == [0, 0, 2, 2, 3, 3]  # id 1 (no mass) is never drawn
    filtered = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert inverse_cdf_sample(filtered, torch.tensor([1.0])).tolist() == [1]  # rounding at the top end


def test_inverse_cdf_frequencies_follow_probabilities():
    probs = torch.tensor([0.125, 0.5, 0.0, 0.375])
    m = 800
    u = (torch.arange(m) + 0.5) / m  # evenly spread uniforms: counts are exact
    counts = torch.bincount(inverse_cdf_sample(probs.expand(m, 4), u), minlength=4)
    assert counts.tolist() == [100, 400, 0, 300]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_noise_makes_samples_deterministic_and_independent(model, cfg_scale):
    labels = torch.tensor([0, 1, 2, 3])
    noise = sample_noise(7, range(4), 16)
    kw = dict(cfg_scale=cfg_scale, top_k=20, top_p=0.9)
    a = generate(model, labels, noise=noise, **kw)
    assert torch.equal(a, generate(model, labels, noise=noise, use_cache=False, **kw))
    other = noise.clone()
    other[1:] = torch.rand(3, 16)  # change the other samples' randomness only
    b = generate(model, labels, noise=other, **kw)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])
    assert torch.equal(sample_noise(7, [2], 16)[0], noise[2])  # a sample's noise depends on (seed, index) only


def test_labels_are_seeded_and_classes_cycle():
    a = make_labels(1000, 10, seed=3)
    assert a.dtype == np.int64 and a.min() >= 0 and a.max() == 9
    np.testing.assert_array_equal(a, make_labels(1000, 10, seed=3))
    assert not np.array_equal(a, make_labels(1000, 10, seed=4))
    assert make_labels(5, 10, 0, classes=[7, 2]).tolist() == [7, 2, 7, 2, 7]
    with pytest.raises(ValueError, match="12"):
        make_labels(5, 10, 0, classes=[12])


def test_batches_are_dealt_round_robin():
    assert batches_of_rank(7, 0, 3) == [0, 3, 6] and batches_of_rank(7, 2, 3) == [2, 5]
    assert sorted(sum((batches_of_rank(10, r, 4) for r in range(4)), [])) == list(range(10))


def test_save_grid(tmp_path):
    images = np.zeros((5, 8, 8, 3), np.uint8)
    images[4] = 200
    path = save_grid(images, tmp_path / "g.png", nrow=3, pad=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    assert (grid[12:20, 12:20] == 200).all() and (grid[2:10, 2:10] == 0).all() and (grid[0] == 255).all()
    with pytest.raises(ValueError, match="uint8"):
        save_grid(images.astype(np.float32), tmp_path / "x.png")


def settings(**kw):
    base = dict(num_samples=10, batch_size=3, seed=5, cfg_scale=2.0, temperature=1.0, top_k=30)
    return SampleSettings(**{**base, **kw})


def test_two_ranks_in_turn_equal_one_rank(model, tokenizer, tmp_path):
    one = sample_to_npz(model, tokenizer.decode, tmp_path / "one.npz", settings(), grid=4)
    assert sample_to_npz(model, tokenizer.decode, tmp_path / "two.npz", settings(), rank=1, world=2) is None
    two = sample_to_npz(model, tokenizer.decode, tmp_path / "two.npz", settings(), rank=0, world=2, grid=0)
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == (10, 16, 16, 3) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        np.testing.assert_array_equal(a["arr_1"], make_labels(10, 4, 5))
    assert (tmp_path / "one.png").exists() and not (tmp_path / "two.png").exists()
    assert not list((tmp_path / "one.npz.parts").glob("batch_*"))  # parts removed once assembled


def test_resume_skips_finished_batches_and_refuses_other_settings(model, tokenizer, tmp_path):
    out = tmp_path / "s.npz"
    full = sample_to_npz(model, tokenizer.decode, tmp_path / "full.npz", settings(), grid=0)
    # a job that made only batch 1 before stopping: rank 1 of 3 makes batch 1 only
    sample_to_npz(model, tokenizer.decode, out, settings(), rank=1, world=3)
    work = tmp_path / "s.npz.parts"
    mtime = batch_file(work, 1).stat().st_mtime_ns
    calls = []

    def counting_decode(codes):
        calls.append(len(codes))
        return tokenizer.decode(codes)

    sample_to_npz(model, counting_decode, out, settings(), keep_parts=True, grid=0)
    assert calls == [3, 3, 1]  # batches 0, 2, 3 (batch 1 was done)
    assert batch_file(work, 1).stat().st_mtime_ns == mtime
    with np.load(out) as a, np.load(full) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    with pytest.raises(ValueError, match="top_k: was 30, now 5"):
        sample_to_npz(model, tokenizer.decode, out, settings(top_k=5))
    meta = json.loads((work / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["batch_size"] == 3


def test_bad_settings_are_refused(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="top_p"):
        sample_to_npz(model, tokenizer.decode, tmp_path / "x.npz", settings(top_p=0.0))


@pytest.mark.parametrize("module", ["star_scale.evaluate.sample", "star_scale.evaluate", "star_scale.evaluate.probe"])
def test_cli_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    assert "usage: star-scale" in capsys.readouterr().out


def test_ranks_come_from_the_launcher_environment(monkeypatch):
    from star_scale.evaluate.sample import dist_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist_env() == (2, 4, 1)
