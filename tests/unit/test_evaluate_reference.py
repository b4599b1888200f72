"""`evaluate --ref`: ADM reference batches by name, resolution and sha256, with the default weights."""
import json
import logging

import numpy as np
import pytest

import star_scale.evaluate.reference as reference
from star_scale.evaluate import main

pytestmark = pytest.mark.usefixtures("one_thread")


def images(path, n, side, seed=0):
    np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8))
    return path


def test_a_reference_at_another_resolution_is_refused(tmp_path, capsys):
    sample = images(tmp_path / "samples.npz", 2, 32)
    ref = images(tmp_path / "ref.npz", 2, 64)
    assert main([str(sample), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"star-scale evaluate: error: {ref}: reference batch at 64 px, samples at 32 px: FID is only "
                   "comparable at one resolution; use the 32 px reference (e.g. VIRTUAL_imagenet32_labeled.npz) "
                   "or sample at 64 px")


def test_a_statistics_only_adm_batch_is_known_by_its_name(tmp_path, capsys):
    sample = images(tmp_path / "samples.npz", 2, 64)
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", mu=np.zeros(2048), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    assert main([str(sample), "--ref", str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")]) == 2
    assert "reference batch at 256 px, samples at 64 px" in capsys.readouterr().err


def test_a_known_name_holding_other_images_is_refused(tmp_path):
    ref = images(tmp_path / "VIRTUAL_imagenet256_labeled.npz", 2, 64)
    with pytest.raises(ValueError, match="named like the ADM 256 px reference batch but holds 64 px images"):
        reference.check_reference(ref, 64)


def test_the_256_px_batch_is_pinned_and_a_partial_download_is_named_without_hashing(tmp_path, caplog):
    ref = images(tmp_path / "VIRTUAL_imagenet256_labeled.npz", 2, 256)
    pinned = reference.KNOWN_REFERENCES[ref.name]
    assert len(pinned.sha256) == 64 and pinned.size == 2_037_122_530

    def no_hashing(path):
        raise AssertionError("a file of the wrong size was hashed")

    with caplog.at_level(logging.WARNING):
        assert reference.check_reference(ref, 256, sha256=no_hashing) == 256
    assert (f"{ref}: {ref.stat().st_size} bytes, but the published file has 2037122530 (sha256 {pinned.sha256}): "
            "a partial or different download gives different FID") in caplog.text


def test_a_pinned_reference_of_the_right_size_with_other_bytes_warns(tmp_path, monkeypatch, caplog):
    ref = images(tmp_path / "VIRTUAL_imagenet64_labeled.npz", 2, 64)
    monkeypatch.setitem(reference.KNOWN_REFERENCES, ref.name, reference.Known(64, "0" * 64, ref.stat().st_size))
    with caplog.at_level(logging.WARNING):
        assert reference.check_reference(ref, 64) == 64
    assert f"{ref}: sha256 " in caplog.text and f"differs from the published file's {'0' * 64}" in caplog.text
    caplog.clear()
    from star_scale.evaluate.inception_default import sha256_of
    monkeypatch.setitem(reference.KNOWN_REFERENCES, ref.name, reference.Known(64, sha256_of(ref), ref.stat().st_size))
    with caplog.at_level(logging.WARNING):
        assert reference.check_reference(ref, 64) == 64
    assert caplog.text == ""


def test_default_weights_give_fid_sfid_precision_recall(tmp_path, capsys):
    sample = images(tmp_path / "samples.npz", 6, 32)
    ref = images(tmp_path / "ref.npz", 6, 32)  # the same images: FID 0, precision = recall = 1
    assert main([str(sample), "--ref", str(ref)]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"num_samples", "num_reference", "fid", "sfid", "precision", "recall", "missing"}
    assert abs(result["fid"]) < 1e-3 and abs(result["sfid"]) < 1e-3
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert [line.split(":")[0] for line in lines[:-1]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
