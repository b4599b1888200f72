"""The offline tokenization job: folder -> Zarr shards -> loader, bad input, kill -9 and resume, task splits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from star_scale.data import TokenLoader, open_store, schema
from star_scale.demo.data import make_demo_images
from star_scale.tokenizer import PatchTokenizer
from tokenize_data import job
from tokenize_data.images import ten_crops

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_demo_images(tmp_path_factory.mktemp("img") / "train", classes=4, per_class=8, size=36, seed=0)  # 32 images


@pytest.fixture(scope="module")
def tok_file(images, tmp_path_factory):
    crops = np.concatenate([ten_crops(Image.open(f).convert("RGB"), 32) for f in sorted(images.rglob("*.png"))[:16]])
    path = tmp_path_factory.mktemp("tok") / "tok.pt"
    PatchTokenizer.fit(crops, codebook_size=64, seed=0).save(path)
    return path


@pytest.fixture(scope="module")
def reference(images, tok_file, tmp_path_factory):
    """An uninterrupted single-process run: 8 units of 4 rows, chunks of 2."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    summary = job.run(images, out, tokenizer=str(tok_file), shard_size=4, chunk_size=2, progress=False, log=lambda m: None)
    assert summary["complete"] and summary["units"] == 8
    return out


def _arrays(out):
    g = zarr.open_group(str(out), mode="r")
    return g[schema.CODES][:], g[schema.LABELS][:]


def test_roundtrip_folder_to_loader_two_ranks(images, reference):
    assert job.verify(reference, print_report=False)["ok"]
    store = open_store(reference)
    a = store.attrs
    assert a["tokenizer"]["name"] == "patch-kmeans-64-p4-32px" and len(a["tokenizer"]["weights_hash"]) == 64
    assert (a["image_size"], a["grid_size"], a["crops"], a["num_classes"]) == (32, 8, 10, 4)
    assert a["class_names"] == ["00_circle", "01_square", "02_triangle", "03_cross"]
    assert a["source"]["count"] == 32 and a["source"]["root"] == str(images.resolve())
    codes, labels = _arrays(reference)
    assert codes.shape == (32, 10, 64) and codes.dtype == np.uint16 and labels.dtype == np.int32
    # row -> source: labels follow the class folder; rows are a fixed permutation mixing classes
    rows = [line.split("\t") for line in (reference / schema.SOURCES_FILE).read_text().splitlines()]
    assert [int(lab) for _, lab in rows] == labels.tolist()
    assert all(p.startswith(a["class_names"][int(lab)] + "/") for p, lab in rows)
    assert labels.tolist() != sorted(labels.tolist())
    # the codes are the tokenizer's codes of the ten crops of that very file
    tok = PatchTokenizer.from_saved(__import__("torch").load(reference / schema.TOKENIZER_FILE, weights_only=True))
    r = 5
    crops = ten_crops(Image.open(images / rows[r][0]).convert("RGB"), 32)
    assert np.array_equal(codes[r], tok.encode(crops).numpy())
    # the loader: every (sample, label) exactly once per epoch across two ranks, deterministic
    index = {}
    for row in range(32):
        for c in range(10):
            index.setdefault(codes[row, c].tobytes(), set()).add(row)
    for epoch in range(2):
        seen = []
        for rank in range(2):
            ld = TokenLoader(store, 4, views=2, rank=rank, world_size=2, seed=7)
            ld.load_state_dict({"epoch": epoch, "batch_in_epoch": 0})
            assert ld.batches_per_epoch(epoch) == 4
            it = iter(ld)
            for _ in range(4):
                b = next(it)
                for toks, lab in zip(b.tokens.numpy().astype(np.uint16), b.labels.tolist()):
                    row = index[toks[0].tobytes()] & index[toks[1].tobytes()]
                    assert len(row) == 1
                    row = row.pop()
                    assert lab == labels[row]
                    seen.append(row)
            ld.close()
        assert sorted(seen) == list(range(32)), f"epoch {epoch}"


def test_task_split_env_and_workers_match_reference(images, tok_file, reference, tmp_path, monkeypatch):
    out = tmp_path / "split.zarr"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert job.task_split(None, None) == (1, 2)
    s1 = job.run(images, out, tokenizer=str(tok_file), shard_size=4, chunk_size=2, progress=False, log=lambda m: None)
    assert not s1["complete"] and s1["units_done"] == 4
    done = sorted(p.name for p in (out / schema.JOB_DIR / "done").iterdir())
    assert done == [f"unit-{u:06d}.json" for u in (1, 3, 5, 7)]
    assert not job.verify(out, print_report=False)["ok"]
    with pytest.raises(Exception, match="incomplete"):
        open_store(out)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    # the other task, as two worker processes, via the command line
    assert job.main([str(images), str(out), "--task-id", "0", "--num-tasks", "2", "--workers", "2", "--no-progress"]) == 0
    assert job.verify(out, print_report=False)["ok"]
    for a, b in zip(_arrays(out), _arrays(reference)):
        assert np.array_equal(a, b)
    # a finished job re-run does nothing; another tokenizer is refused
    assert job.run(images, out, tokenizer=str(tok_file), progress=False, log=lambda m: None)["written_units"] == 0
    other = tmp_path / "other.pt"
    PatchTokenizer.fit(np.zeros((4, 32, 32, 3), np.uint8) + 9, codebook_size=8).save(other)
    with pytest.raises(job.JobError, match="tokenizer"):
        job.run(images, out, tokenizer=str(other), progress=False, log=lambda m: None)


def _wait_for(cond, timeout, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def test_kill_9_and_rerun_gives_identical_arrays(images, tok_file, reference, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "tokenize_data", str(images), str(out), "--tokenizer", str(tok_file),
           "--shard-size", "4", "--chunk-size", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    slow = {**env, job._PAUSE_PER_IMAGE: "0.02", job._PAUSE_BEFORE_MARK: "2"}

    def start(e):
        return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # 1: killed while the first unit is being encoded
    p = start(slow)
    assert _wait_for(lambda: (out / schema.JOB_DIR).is_dir(), 60, p), "job did not start"
    time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # 2: killed with unit 1's data fully written but its done marker not yet (the worst moment)
    p = start(slow)
    shard1 = schema.shard_files(out, 1)[0]
    assert _wait_for(lambda: shard1.is_file() and not job._marker(out, 1).exists(), 60, p), "no half-written unit seen"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not job._marker(out, 1).exists() and shard1.is_file()
    report = job.verify(out, print_report=False)
    assert not report["ok"] and report["units_missing"] >= 7
    # 3: the same command again, uninterrupted
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "already done" in p.stderr
    assert job.verify(out, print_report=False)["ok"]
    for a, b in zip(_arrays(out), _arrays(reference)):
        assert np.array_equal(a, b)
    assert (out / schema.SOURCES_FILE).read_bytes() == (reference / schema.SOURCES_FILE).read_bytes()
    assert not list(out.rglob("*.partial")) and not list(out.parent.glob(".killed.zarr.tmp-*"))


def _bad_folder(root: Path) -> dict:
    """Two classes of good images plus every kind of bad input; returns {relative path: expected skip reason}."""
    make_demo_images(root, classes=2, per_class=4, size=36, seed=1)
    d = root / "00_circle"
    good = Image.open(d / "00000.png").convert("RGB")
    png = (d / "00000.png").read_bytes()
    good.save(d / "full.jpg", quality=90)
    jpg = (d / "full.jpg").read_bytes()
    (d / "full.jpg").unlink()
    (d / "trunc.png").write_bytes(png[: len(png) // 2])
    (d / "trunc.jpg").write_bytes(jpg[: len(jpg) * 2 // 3])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.png").write_bytes(b"this is not an image at all\n" * 10)
    (d / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)))
    (d / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("outside the class folders")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(d / "tiny.png")
    # convertible
    e = root / "01_square"
    good.convert("CMYK").save(e / "cmyk.jpg")
    good.convert("L").save(e / "gray.png")
    rgba = good.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(good.size))
    rgba.save(e / "alpha.png")
    Image.fromarray((np.asarray(good.convert("L")).astype(np.uint16) * 257)).save(e / "deep16.png")
    pal = good.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(e / "pal.png", transparency=0)
    good.resize((24, 24)).save(e / "small24.png")
    return {"00_circle/trunc.png": "truncated or corrupt", "00_circle/trunc.jpg": "truncated or corrupt",
            "00_circle/empty.jpg": "empty file", "00_circle/text.png": "not an image",
            "00_circle/garbage.jpg": "", "00_circle/tiny.png": "too small"}


def test_bad_input_never_stops_the_job(tmp_path, tok_file, capsys):
    src = tmp_path / "bad"
    expected = _bad_folder(src)
    out = tmp_path / "bad.zarr"
    assert job.main([str(src), str(out), "--tokenizer", str(tok_file), "--shard-size", "4", "--chunk-size", "2",
                     "--no-progress", "--verify"]) == 0
    assert "verify" in capsys.readouterr().out
    rep = json.loads((out / schema.REPORT_JSON).read_text())
    skipped = {d["path"]: d["reason"] for d in rep["skipped"]}
    assert set(skipped) == set(expected)
    for path, reason in expected.items():
        assert reason in skipped[path], (path, skipped[path])
    ignored = {d["path"] for d in rep["ignored"]}
    assert ignored == {"README.md", "00_circle/notes.txt"}
    converted = {d["path"]: " ".join(d["notes"]) for d in rep["converted"]}
    assert "CMYK" in converted["01_square/cmyk.jpg"] and "L converted" in converted["01_square/gray.png"]
    assert "white" in converted["01_square/alpha.png"] and "white" in converted["01_square/pal.png"]
    assert "16 to 8 bits" in converted["01_square/deep16.png"] and "upscaled" in converted["01_square/small24.png"]
    text = (out / schema.REPORT_TXT).read_text()
    for path in expected:
        assert f"SKIPPED\t{path}\t" in text
    assert "IGNORED\tREADME.md" in text
    codes, labels = _arrays(out)
    assert rep["rows"] == len(labels) == 8 + 6 + 6 and rep["written"] == 14 == int((labels >= 0).sum())
    assert (labels == schema.LABEL_SKIPPED).sum() == 6 and not codes[labels < 0].any()
    # the loader never serves the skipped rows
    store = open_store(out)
    ld = TokenLoader(store, 2, views=1, prefetch=0)
    it = iter(ld)
    served = np.concatenate([next(it).labels.numpy() for _ in range(ld.batches_per_epoch())])
    assert len(served) == 14 and (served >= 0).all()


def test_list_file_source_and_verify_catches_damage(tmp_path, images, tok_file, capsys):
    files = sorted(images.rglob("*.png"))[:6]
    lst = tmp_path / "train.txt"
    lst.write_text("# path<TAB>class\n" + "".join(f"{f}\t{f.parent.name}\n" for f in files))
    out = tmp_path / "list.zarr"
    s = job.run(lst, out, tokenizer=str(tok_file), shard_size=2, chunk_size=1, row_seed=-1, progress=False, log=lambda m: None)
    assert s["complete"]
    store = open_store(out)
    assert store.attrs["source"]["kind"] == "list" and store.attrs["class_names"] == ["00_circle"]
    assert [line.split("\t")[0] for line in (out / schema.SOURCES_FILE).read_text().splitlines()] == [str(f) for f in files]
    assert job.main(["--verify", str(out)]) == 0
    # damage one shard's labels: verify reports it and fails
    g = zarr.open_group(str(out), mode="r+")
    g[schema.LABELS][2:4] = 0 + np.array([0, 3], dtype=np.int32)
    capsys.readouterr()
    assert job.main(["--verify", str(out)]) == 1
    assert "unit 1 rows [2, 4)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        job.main(["--help"])
    assert e.value.code == 0
    assert "--task-id" in capsys.readouterr().out
