"""Sharded checkpoints under torchrun: asynchronous == synchronous, a write failure on a full disk, the costs.

- ``train.async_save=true`` writes the same bytes as a synchronous save, and training goes on the same;
- a disk that fills during a 2-rank save ends both ranks with one line (no rank left waiting in a
  collective), removes the temporary folder, keeps the previous checkpoint, and the run resumes
  once space is freed;
- ``bench memory --checkpoint``: each of 2 ranks writes about half of what 1 rank writes, and no
  save or load adds anywhere near a whole copy of the state to a rank's resident memory;
- a ZeRO-3 checkpoint resumes at ZeRO-1 (resharded), and one of the earlier format still resumes.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, dist_env, free_port, run_torchrun, torchrun_cmd  # noqa: E402


def train_args(store: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["-m", "star_scale.cli", "train", "model.preset=tiny", "model.vocab_size=64", "model.num_classes=4",
            "model.grid_size=4", "objective.name=star", f"data.path={store}", "data.global_batch=8",
            "optimizer.lr_batch=null", "train.device=cpu", f"train.steps={steps}", "train.ckpt_every=2",
            "train.keep_checkpoints=3", "train.log_every=1", f"train.out_dir={out}", "tracking.enabled=false", *extra]


def manifest(run: Path) -> dict:
    return {d.name: json.loads((d / "meta.json").read_text())["files"]
            for d in sorted((run / "checkpoints").glob("step_*"))}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", ["parallel.zero_stage=3", "parallel.zero_stage=1"])
def test_async_save_writes_what_a_sync_save_writes(tmp_path, token_store, layout):
    runs = {}
    for mode in ("false", "true"):
        runs[mode] = tmp_path / f"async-{mode}"
        run_torchrun(2, *train_args(token_store, runs[mode], 6, layout, f"train.async_save={mode}"),
                     log=tmp_path / f"{mode}.log")
    sync, async_ = manifest(runs["false"]), manifest(runs["true"])
    assert list(sync) == ["step_00000002", "step_00000004", "step_00000006"]
    assert sync == async_  # every file of every checkpoint, byte for byte (sha256)
    assert losses(runs["false"]) == losses(runs["true"])


def test_disk_full_during_a_two_rank_save(tmp_path, token_store, tmpfs):
    small_disk = tmpfs("8m")
    run = small_disk / "run"
    run_torchrun(2, *train_args(token_store, run, 2), log=tmp_path / "a.log")
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step_00000002").rglob("*") if f.is_file())
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - 64 * 1024))
    assert shutil.disk_usage(small_disk).free < size

    log = tmp_path / "full.log"
    with open(log, "w") as f:  # a rank left in a collective would hang until the 1-minute timeout, then fail
        out = subprocess.run(torchrun_cmd(2, *train_args(token_store, run, 6), port=free_port()), env=dist_env(),
                             cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=120)
    text = log.read_text()
    assert out.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("star-scale: error:")]
    assert len(errors) == 1, text[-3000:]  # rank 0 says it; rank 1 ends quietly
    assert str(run / "checkpoints" / "step_00000004") in errors[0] and "bytes are free" in errors[0]
    assert not re.search(r"\[rank\d\]:.*Traceback", text), text[-3000:]  # no rank's traceback
    assert "Timeout" not in text and "timed out" not in text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]  # no .tmp- left

    filler.unlink()
    run_torchrun(2, *train_args(token_store, run, 6), log=tmp_path / "resumed.log")
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in (tmp_path / "resumed.log").read_text()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_bench_memory_checkpoint(tmp_path):
    env = dict(dist_env(), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "star_scale.bench.memory", "--checkpoint", "--preset", "small",
                          "--objective", "star"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    print("\n".join(lines))
    bytes_ratio = float(re.fullmatch(r"ratio ckpt-bytes-per-rank-2/1 = ([\d.]+)", lines[-1]).group(1))
    added = re.fullmatch(r"peak RSS added / whole state, N=2: save ([\d.]+), async save ([\d.]+), load ([\d.]+)",
                         lines[-2])
    save, async_save, load = map(float, added.groups())
    assert bytes_ratio <= 0.55
    # No rank holds a whole copy of weights, moments or teacher while saving or loading: a synchronous save
    # writes from the live tensors, a load reads one tensor at a time, an asynchronous save copies its 1/2 share.
    assert save < 0.2 and load < 0.2 and async_save < 0.7


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, token_store):
    """4 steps at ZeRO-3 on 2 ranks, checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("zero3") / "run"
    run_torchrun(2, *train_args(token_store, run, 4), log=run.parent / "a.log")
    return run


def resumed_from_step_2(source: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(source, run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    return run


def test_resume_at_another_zero_stage_reshards(zero3_run, tmp_path, token_store):
    run = resumed_from_step_2(zero3_run, tmp_path)
    run_torchrun(2, *train_args(token_store, run, 4, "parallel.zero_stage=1"), log=tmp_path / "b.log")
    assert "differs from this run's" in (tmp_path / "b.log").read_text()
    want, got = losses(zero3_run), losses(run)
    assert got[:2] == want[:2] and got[2:] == pytest.approx(want[2:], rel=1e-5)  # other reduction order only


def test_checkpoint_of_the_earlier_format_still_resumes(zero3_run, tmp_path, token_store):
    """``ds/`` + ``consolidated.pt`` (format v1), rebuilt here from a sharded checkpoint, resumes on the same path."""
    import torch

    from star_scale.parallel.consolidated import DISTRIBUTED_V1, from_shards
    from tests.payloads import reseal

    run = resumed_from_step_2(zero3_run, tmp_path)
    ckpt = run / "checkpoints" / "step_00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    torch.save(from_shards(ckpt, meta), ckpt / "consolidated.pt")
    shutil.rmtree(ckpt / "shards")
    meta.update(format=DISTRIBUTED_V1, files={n: {} for n in ("consolidated", "trainer/rank_00000", "trainer/rank_00001")})
    (ckpt / "meta.json").write_text(json.dumps(meta))
    reseal(ckpt)
    run_torchrun(2, *train_args(token_store, run, 4), log=tmp_path / "b.log")
    assert f"resumed from {ckpt}" in (tmp_path / "b.log").read_text()
    assert losses(run) == losses(zero3_run)
