"""`star-scale train` under torchrun: kill -9 at a random step and resume (through a truncated
checkpoint) on the uninterrupted trajectory; resume 2 ranks -> 1 rank; export for sampling."""
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, dist_env, free_port, run_torchrun, torchrun_cmd  # noqa: E402

STEPS = 12


def train_args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "star_scale.cli", "train", "model.preset=tiny", "model.vocab_size=64", "model.num_classes=4",
            "model.grid_size=4", "objective.name=star", f"data.path={store}", "data.global_batch=8",
            "optimizer.lr=1e-3", "optimizer.lr_batch=null", "train.device=cpu", f"train.steps={STEPS}",
            "train.ckpt_every=2", "train.log_every=4", f"train.out_dir={out}", *extra]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def kill_at_step(args: list[str], run: Path, step: int, log: Path) -> int:
    """Launch, SIGKILL the whole launch (agent and ranks) once metrics.jsonl reaches ``step``."""
    with open(log, "w") as f:
        p = subprocess.Popen(torchrun_cmd(2, *args, port=free_port()), env=dist_env(), cwd=ROOT, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        metrics = run / "metrics.jsonl"
        while time.monotonic() < deadline and p.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
                # torchrun starts its ranks in their own sessions: kill each by pid, ranks first.
                for proc in psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]:
                    proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        p.wait()
    assert p.returncode == -signal.SIGKILL, f"run ended before the kill ({p.returncode}); see {log}"
    return len(metrics.read_text().splitlines())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, token_store):
    run = tmp_path_factory.mktemp("A") / "run"
    run_torchrun(2, *train_args(token_store, run), log=run.parent / "log.txt")
    return run


def test_kill_9_then_resume_through_a_truncated_checkpoint(tmp_path, token_store, uninterrupted):
    run = tmp_path / "B"
    step = random.randint(5, STEPS - 2)
    print(f"killing at step {step}")
    reached = kill_at_step(train_args(token_store, run), run, step, tmp_path / "killed.log")
    ckpts = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(ckpts) >= 2, f"killed at step {reached} with checkpoints {ckpts}"
    damaged = ckpts[-1] / "shards" / "rank_00001.bin"
    with open(damaged, "r+b") as f:  # a half-written file on disk
        f.truncate(damaged.stat().st_size // 2)

    run_torchrun(2, *train_args(token_store, run), log=tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert "skipping damaged checkpoint" in log and str(damaged) in log
    assert f"resumed from {ckpts[-2]}" in log
    assert losses(run) == losses(uninterrupted)  # bit for bit: weights, optimizer, teacher, RNG, loader


def test_resume_two_ranks_on_one_and_back(tmp_path, uninterrupted, token_store):
    """2 ranks (ZeRO-3) -> 1 process (the local engine, from the shards) -> 2 ranks (from its checkpoint)."""
    run = tmp_path / "E"
    shutil.copytree(uninterrupted, run)
    run_torchrun(1, *train_args(token_store, run, f"train.steps={STEPS + 2}"), log=tmp_path / "to1.log")
    log = (tmp_path / "to1.log").read_text()
    assert "loading its shards into one process" in log
    assert f"resumed from {run / 'checkpoints' / f'step_{STEPS:08d}'}" in log
    run_torchrun(2, *train_args(token_store, run, f"train.steps={STEPS + 4}"), log=tmp_path / "to2.log")
    log = (tmp_path / "to2.log").read_text()
    assert "single-process checkpoint" in log
    assert f"resumed from {run / 'checkpoints' / f'step_{STEPS + 2:08d}'}" in log
    got = losses(run)
    assert len(got) == STEPS + 4 and got[:STEPS] == losses(uninterrupted)
    assert all(0 < x < 20 for x in got[STEPS:])


def test_export_student_and_teacher(tmp_path, uninterrupted):
    from star_scale.models.model_file import load_model_file
    from star_scale.parallel.consolidated import from_shards
    from star_scale.parallel.export import export

    written = export(uninterrupted, tmp_path)
    ckpt = Path(written["checkpoint"])
    state = from_shards(ckpt, json.loads((ckpt / "meta.json").read_text()))
    student, teacher = load_model_file(written["student"]), load_model_file(written["teacher"])
    for name, p in student.named_parameters():
        assert torch.equal(p, state["module"][f"student.{name}"])
        assert torch.equal(dict(teacher.named_parameters())[name], state["teacher"][name])
