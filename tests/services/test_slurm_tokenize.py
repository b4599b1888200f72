"""`star-scale submit-tokenize` on the real local Slurm: a 4-task array equals one process."""
import subprocess
import sys

import numpy as np

from star_scale.data.store import open_store
from star_scale.demo.data import make_demo_images

JOB = ["--tokenizer", "patch-kmeans:64", "--image-size", "16", "--shard-size", "16", "--fit-images", "64"]


def test_array_of_4_tasks_builds_the_same_store_as_one_process(slurm, tmp_path):
    images = make_demo_images(tmp_path / "images", classes=4, per_class=24, size=18)
    single = tmp_path / "single.zarr"
    subprocess.run([sys.executable, "-m", "tokenize_data", str(images), str(single), *JOB, "--no-progress"], check=True)

    arrayed = tmp_path / "array.zarr"
    out = slurm.run(sys.executable, "-m", "star_scale.cli", "submit-tokenize", str(images), str(arrayed),
                    "--tasks", "4", "--cpus-per-task", "1", "--time", "00:10:00", *JOB)
    words = out.stdout.split()
    verify_job = words[words.index("verify") + 2].rstrip(":")
    assert slurm.wait(verify_job, timeout=300) == "COMPLETED", [
        p.read_text() for p in (tmp_path / "array.zarr.slurm").glob("*.out")]
    logs = sorted((tmp_path / "array.zarr.slurm").glob("tokenize-*_*.out"))
    assert len(logs) == 4
    assert "OK" in next((tmp_path / "array.zarr.slurm").glob("verify-*.out")).read_text()

    a, b = open_store(single), open_store(arrayed)
    assert len(a) == len(b) == 96
    np.testing.assert_array_equal(a.read(0, 96)[0], b.read(0, 96)[0])
    np.testing.assert_array_equal(a.read(0, 96)[1], b.read(0, 96)[1])
