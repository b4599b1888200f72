"""Resuming a DeepSpeed run whose folder someone else rewrote (files replaced, meta.json resealed).

The model state is raw data (``shards/``); the only pickles are the trainer
files, which every rank checks before any loading, so a payload stops all
ranks together.  A clean folder resumes through the sharded load at ZeRO-3,
ZeRO-1 and TP 2.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, dist_env, free_port, run_torchrun, torchrun_cmd  # noqa: E402

from tests.payloads import reseal, save_payload  # noqa: E402

GLOBAL = "shutil.copyfile"


def train_args(store: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["-m", "star_scale.cli", "train", "model.preset=tiny", "model.vocab_size=64", "model.num_classes=4",
            "model.grid_size=4", "objective.name=star", f"data.path={store}", "data.global_batch=8",
            "optimizer.lr_batch=null", "train.device=cpu", f"train.steps={steps}", "train.ckpt_every=2",
            "train.log_every=1", f"train.out_dir={out}", "tracking.enabled=false", *extra]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, token_store):
    """A 2-step 2-rank run in a layout (one config override), made once per layout."""
    runs = {}

    def make(layout: str) -> Path:
        if layout not in runs:
            run = tmp_path_factory.mktemp(layout.replace("=", "-")) / "run"
            run_torchrun(2, *train_args(token_store, run, 2, layout), log=run.parent / "a.log")
            runs[layout] = run
        return runs[layout]
    return make


ZERO3 = "parallel.zero_stage=3"


@pytest.mark.parametrize("layout", [ZERO3, "parallel.zero_stage=1", "parallel.tp=2"])
def test_clean_folder_resumes_through_the_sharded_load(two_rank_run, tmp_path, token_store, layout):
    run = tmp_path / "run"
    shutil.copytree(two_rank_run(layout), run)
    run_torchrun(2, *train_args(token_store, run, 4, layout), log=tmp_path / "b.log")
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in (tmp_path / "b.log").read_text()


def tampered(two_rank_run, tmp_path, name: str) -> tuple[Path, Path, Path]:
    """A copy of the ZeRO-3 run with ``name`` (in its checkpoint) carrying a payload, meta.json resealed."""
    run = tmp_path / "run"
    shutil.copytree(two_rank_run(ZERO3), run)
    ckpt = run / "checkpoints" / "step_00000002"
    target, marker = ckpt / name, tmp_path / "marker"
    save_payload(target, marker, torch.load(target, weights_only=True))
    reseal(ckpt)
    return run, target, marker


def test_payload_in_another_ranks_file_stops_every_rank(two_rank_run, tmp_path, token_store):
    # Only rank 1 reads this file.
    run, target, marker = tampered(two_rank_run, tmp_path, "trainer/rank_00001.pt")
    log = tmp_path / "c.log"
    with open(log, "w") as f:
        out = subprocess.run(torchrun_cmd(2, *train_args(token_store, run, 4), port=free_port()), env=dist_env(), cwd=ROOT,
                             stdout=f, stderr=subprocess.STDOUT, timeout=240)
    text = log.read_text()
    assert out.returncode != 0, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("star-scale: error:")]
    assert len(errors) == 2 and all(str(target) in e and GLOBAL in e for e in errors), text[-3000:]  # both ranks
    assert len(re.findall(r"exitcode\s*:\s*2", text)) >= 1, text[-3000:]
    assert not marker.exists()


def test_one_process_resume_of_a_tampered_rank_file_exits_2(two_rank_run, tmp_path, token_store):
    """The elastic path (2 ranks -> 1 process) reads trainer/rank_00000.pt itself."""
    run, target, marker = tampered(two_rank_run, tmp_path, "trainer/rank_00000.pt")
    out = subprocess.run([sys.executable, *train_args(token_store, run, 4)], env=dist_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("star-scale: error:") and str(target) in last and GLOBAL in last
    assert not marker.exists()
