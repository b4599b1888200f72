"""kill -9 of `star-scale tokenize`: nothing of the job runs on, and the rerun writes the same arrays."""
import os
import signal
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from star_scale.data import schema
from tests.faults.conftest import cli, start, wait_for

ARGS = ["--tokenizer", "patch-kmeans:16", "--image-size", "16", "--shard-size", "4", "--no-progress"]


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            for child in (task / "children").read_text().split():
                out.add(int(child))
                todo.append(int(child))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_kill_9_of_tokenize_leaves_no_orphan_and_rerun_is_identical(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    assert cli("tokenize", tmp_path / "images", ref, *ARGS).returncode == 0

    # 2 s per image: each worker's first unit of 4 images is marked done after 8 s, the rest would take 8 s more
    job = start("tokenize", tmp_path / "images", out, *ARGS, "--workers", "2", STAR_SCALE_TOKENIZE_PAUSE_PER_IMAGE="2.0")
    done = out / schema.JOB_DIR / "done"
    wait_for(lambda: any(done.glob("unit-*.json")) or job.poll() is not None, timeout=90, what="a first unit")
    family = descendants(job.pid)
    assert len(family) >= 2, family  # the workers
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    wait_for(lambda: not any(alive(p) for p in family), timeout=5, what=f"the job's processes {family} to end")
    assert not (out / "report.json").exists()  # it was stopped mid-way

    again = cli("tokenize", tmp_path / "images", out, *ARGS)
    assert again.returncode == 0, again.stderr
    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("codes", "labels"):
        assert np.array_equal(a[name][:], b[name][:])
