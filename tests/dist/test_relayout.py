"""Resuming on another TP size keeps each TP group on one RNG stream, and the replica check catches drift.

TP 1 x DP 2 -> TP 2 x DP 1 with dropout on: the two ranks of the new TP group must
draw the same dropout masks (the old DP rank 0's stream), so their replicated
parameters stay equal (train.check_every=1 checks it every step, to rounding), and the
continued run equals the same resume interrupted and resumed again on TP 2.
"""
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_torchrun  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "worker.py")


def train_args(store: Path, out: Path, steps: int, ckpt_every: int, *extra: str) -> list[str]:
    return ["-m", "star_scale.cli", "train", "model.preset=tiny", "model.vocab_size=64", "model.num_classes=4",
            "model.grid_size=4", "objective.name=star", f"data.path={store}", "data.global_batch=8",
            "optimizer.lr=1e-3", "optimizer.lr_batch=null", "train.device=cpu", "tracking.enabled=false",
            "model.resid_dropout=0.1", "model.ffn_dropout=0.1", "model.token_dropout=0.1",
            f"train.steps={steps}", f"train.ckpt_every={ckpt_every}", "train.log_every=1", "train.check_every=1",
            f"train.out_dir={out}", *extra]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tp1_to_tp2_resume_with_dropout(tmp_path, token_store):
    a, b = tmp_path / "A", tmp_path / "B"
    run_torchrun(2, *train_args(token_store, a, 6, 6, "parallel.tp=1"), log=tmp_path / "tp1.log")
    shutil.copytree(a, b)
    # A: TP 2 from the TP 1 checkpoint, straight to step 12, the replica check on every step.
    run_torchrun(2, *train_args(token_store, a, 12, 6, "parallel.tp=2"), log=tmp_path / "a.log")
    assert "differs from this run's" in (tmp_path / "a.log").read_text()
    # B: the same resume, stopped at 9, resumed on TP 2 (same layout: each rank's own streams).
    run_torchrun(2, *train_args(token_store, b, 9, 9, "parallel.tp=2"), log=tmp_path / "b1.log")
    run_torchrun(2, *train_args(token_store, b, 12, 9, "parallel.tp=2"), log=tmp_path / "b2.log")
    assert f"resumed from {b / 'checkpoints' / 'step_00000009'}" in (tmp_path / "b2.log").read_text()
    assert len(losses(a)) == 12 and losses(a) == losses(b)


@pytest.fixture(scope="module")
def perturb(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("perturb")
    run_torchrun(2, WORKER, "tp2_perturb", str(out), log=out / "log.txt")
    return [json.loads((out / f"tp2_perturb.rank{r}.json").read_text()) for r in range(2)]


def test_the_replica_check_catches_a_perturbed_rank(perturb):
    for r in perturb:
        assert r["before"] == "agree"
        assert r["last_bit"] == "agree"  # one ulp per element: a reduction order, not drift
        assert r["after"].startswith("tensor-parallel replicas differ: parameter student.norm.weight on TP rank 1")


def test_tp_modules_are_built_unallocated(perturb):
    """The engine's TP build of a meta-built module allocates nothing, on any device (CUDA queries fail here)."""
    assert [r["tp_meta"] for r in perturb] == [{"allocated": []}] * 2
