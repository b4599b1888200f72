"""Files from elsewhere never run code: each reader gets a checkpoint whose pickle creates a marker file.

Every attack must end in exit code 2, one line naming the file and the global
it would have run, and no marker.  The --trust-pickle cases show the payload
is live: the same file, loaded in full, does create the marker.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from star_scale import cli
from star_scale.models.gpt import GPT, GPTArgs
from star_scale.models.model_file import model_state_dict
from tests.conftest import TINY
from tests.payloads import reseal, save_payload

ROOT = Path(__file__).resolve().parents[2]
GLOBAL = "shutil.copyfile"


def llamagen_checkpoint() -> dict:
    """The layout LlamaGen's train_c2i.py saves: weights, optimizer, steps and its argparse.Namespace."""
    model = GPT(GPTArgs(layers=2, heads=2, width=64, vocab_size=32, num_classes=4, grid_size=2))
    return {"model": model_state_dict(model), "optimizer": {}, "steps": 3,
            "args": argparse.Namespace(gpt_model="GPT-B")}


def refused(capsys, rc: int, path: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and str(path) in err and GLOBAL in err, err
    return err


def test_import_llamagen_refuses_a_payload_and_trusts_only_when_told(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = save_payload(tmp_path / "evil.pt", marker, llamagen_checkpoint())
    out = tmp_path / "x.pt"
    err = refused(capsys, cli.main(["import-llamagen", str(evil), "--out", str(out)]), evil)
    assert "--trust-pickle" in err and not marker.exists() and not out.exists()

    assert cli.main(["import-llamagen", str(evil), "--out", str(out), "--trust-pickle", "--heads", "2",
                     "--grid-size", "2"]) == 0
    assert marker.exists() and out.is_file()  # the payload is real; only the user's flag let it run


def test_import_llamagen_reads_the_official_layout_safely(tmp_path, capsys):
    ckpt = tmp_path / "GPT.pt"
    torch.save(llamagen_checkpoint(), ckpt)
    assert cli.main(["import-llamagen", str(ckpt), "--out", str(tmp_path / "x.pt"), "--heads", "2",
                     "--grid-size", "2"]) == 0


@pytest.mark.parametrize("content", [{"epoch": 3, "lr": 0.1}, "text"])
def test_import_llamagen_non_llamagen_file_is_one_line_exit_2(tmp_path, capsys, content):
    path = tmp_path / "other.pt"
    path.write_text("not torch") if content == "text" else torch.save(content, path)
    rc = cli.main(["import-llamagen", str(path), "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(path) in err, err
    assert "Traceback" not in err


def test_vq_tokenizer_payload_refused_by_tokenize(tmp_path):
    from star_scale.demo.data import make_demo_images

    images = make_demo_images(tmp_path / "img", classes=2, per_class=2, size=36, seed=0)
    marker = tmp_path / "marker"
    evil = save_payload(tmp_path / "vq.pt", marker)
    out = subprocess.run([sys.executable, "-m", "star_scale.cli", "tokenize", str(images), str(tmp_path / "t.zarr"),
                          "--tokenizer", str(evil), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert str(evil) in last and GLOBAL in last and "--trust-pickle" in last, out.stderr
    assert not marker.exists() and not (tmp_path / "t.zarr").exists()


def test_tokenize_trust_pickle_loads_once_and_keeps_a_weights_only_copy(tmp_path):
    from star_scale.data import schema
    from star_scale.demo.data import make_demo_images
    from star_scale.tokenizer import load_tokenizer
    from star_scale.tokenizer.vq import vq_ds16

    images = make_demo_images(tmp_path / "img", classes=2, per_class=1, size=36, seed=0)
    marker = tmp_path / "marker"
    evil = save_payload(tmp_path / "vq.pt", marker, {"model": vq_ds16(ch=32, codebook_size=64).state_dict()})
    out = tmp_path / "t.zarr"
    rc = subprocess.run([sys.executable, "-m", "star_scale.cli", "tokenize", str(images), str(out), "--tokenizer",
                         str(evil), "--trust-pickle", "--image-size", "32", "--no-progress"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-3000:]
    assert marker.exists() and "--trust-pickle: unpickling in full, which runs shutil.copyfile" in rc.stderr
    marker.unlink()
    load_tokenizer(out / schema.TOKENIZER_FILE)  # the store's copy is weights only
    assert not marker.exists()


def test_vq_loader_trust_pickle_is_explicit(tmp_path):
    from star_scale.tokenizer import TokenizerError, load_tokenizer
    from star_scale.tokenizer.vq import vq_ds16

    marker = tmp_path / "marker"
    sd = {k: v for k, v in vq_ds16(ch=32, codebook_size=64).state_dict().items()}
    evil = save_payload(tmp_path / "vq.pt", marker, {"model": sd, "args": argparse.Namespace(vq_model="VQ-16")})
    with pytest.raises(TokenizerError, match=f"vq.pt: refusing to unpickle {GLOBAL}"):
        load_tokenizer(evil)
    assert not marker.exists()
    load_tokenizer(evil, trust_pickle=True)
    assert marker.exists()


def train_args(token_npz: Path, out: Path, steps: int = 2) -> list[str]:
    return ["train", *TINY, f"data.path={token_npz}", "data.global_batch=16", f"train.steps={steps}",
            "train.ckpt_every=2", "train.log_every=1", f"train.out_dir={out}", "optimizer.lr_batch=null",
            "tracking.enabled=false"]


@pytest.fixture
def run_folder(tmp_path, token_npz, one_thread, capsys):
    run = tmp_path / "run"
    assert cli.main(train_args(token_npz, run)) == 0
    capsys.readouterr()
    return run


@pytest.mark.parametrize("name", ["trainer", "engine"])
def test_resume_from_a_tampered_run_folder_is_refused(run_folder, token_npz, tmp_path, capsys, name):
    """The file replaced and meta.json's size and sha256 updated: the checksum passes, the pickle does not."""
    ckpt = run_folder / "checkpoints" / "step_00000002"
    target = ckpt / f"{name}.pt"
    marker = tmp_path / "marker"
    save_payload(target, marker, torch.load(target, weights_only=True))
    reseal(ckpt)
    rc = cli.main(train_args(token_npz, run_folder, steps=4))
    refused(capsys, rc, target)
    assert not marker.exists()


def test_export_refuses_a_tampered_engine_file(run_folder, tmp_path, capsys):
    ckpt = run_folder / "checkpoints" / "step_00000002"
    marker = tmp_path / "marker"
    save_payload(ckpt / "engine.pt", marker, torch.load(ckpt / "engine.pt", weights_only=True))
    reseal(ckpt)
    refused(capsys, cli.main(["export", str(run_folder), "--out", str(tmp_path / "export")]), ckpt / "engine.pt")
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_evaluate_refuses_a_payload_inception_file(tmp_path, capsys):
    from star_scale.evaluate.inception import InceptionV3

    marker = tmp_path / "marker"
    evil = save_payload(tmp_path / "pt_inception.pth", marker, dict(InceptionV3().state_dict()))
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    refused(capsys, cli.main(["evaluate", str(samples), "--inception-weights", str(evil)]), evil)
    assert not marker.exists()


def test_trainer_state_is_weights_only(run_folder):
    """What the project writes holds tensors, lists and numbers only: nothing for weights_only to allow."""
    ckpt = run_folder / "checkpoints" / "step_00000002"
    for f in sorted(ckpt.glob("*.pt")):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == [], f
    meta = json.loads((ckpt / "meta.json").read_text())
    assert sorted(meta["files"]) == ["engine", "trainer"]
