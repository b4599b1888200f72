"""Two Slurm nodes on this machine (cluster/local/start.sh --nodes 2): each a network namespace
with its own hostname and address. Training across them equals one process; requeue and node
loss resume bit for bit; arrays spread over both nodes."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from star_scale.config import load_config
from star_scale.data.loader import TokenLoader
from star_scale.data.store import save_npz_store
from tests.conftest import TINY
from tests.services.slurm import ROOT, LocalSlurm, have_slurm, why_not_netns

RECIPE = "recipes/tiny-star.yaml"
# Dropout off: its draws follow each rank's RNG, so 2 ranks and 1 process would differ by construction.
NO_RANDOMNESS = ["model.class_dropout=0", "model.token_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0"]
STEPS = 20
# The 1-process tolerances of tests/dist: ZeRO-3 data parallel (ST-AR), TP (ST-AR, Adam-amplified summation order).
RTOL_ZERO3, RTOL_TP = 1e-5, 1e-3
STEP_START_S = 15  # the training step must start within this (cluster.step_start_timeout)


@pytest.fixture(scope="module")
def two_nodes():
    if why_not_netns():
        pytest.skip(why_not_netns())
    if not have_slurm():
        pytest.fail("slurm-wlm and munge are not installed (`make test` installs them when run as root)")
    cluster = LocalSlurm(nodes=2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tokens") / "tokens.npz"
    save_npz_store(path, rng.integers(0, 64, (128, 10, 16)).astype(np.uint16), rng.integers(0, 4, 128).astype(np.int32),
                   codebook_size=64, num_classes=4, chunk_size=16)
    return path


def overrides(store, out_dir, *extra):
    return [*TINY, *NO_RANDOMNESS, f"data.path={store}", "data.global_batch=16", f"train.steps={STEPS}",
            "train.log_every=1", "train.ckpt_every=5", f"train.out_dir={out_dir}", "optimizer.lr_batch=null",
            "tracking.enabled=false", "cluster.gpus_per_node=0", "cluster.tasks_per_node=1",
            "cluster.cpus_per_task=1", "cluster.time=00:10:00", f"cluster.step_start_timeout={STEP_START_S}", *extra]


def submit(cluster, store, out_dir, *extra) -> str:
    out = cluster.run(sys.executable, "-m", "star_scale.cli", "submit", RECIPE, *overrides(store, out_dir, *extra),
                      "--nodes", "2")
    return out.stdout.split()[2].rstrip(":")  # "submitted job 12: path"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finish(cluster, job, run_dir, release: bool = False) -> str:
    state = cluster.wait(job, timeout=300, release=release)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", f"{log[-5000:]}\nslurmctld.log:\n{cluster.controller_log(80)}"
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))  # no line lost or repeated
    return log


def wait_steps(run_dir, n, timeout=300):
    deadline = time.monotonic() + timeout
    while len(metrics(run_dir)) < n:
        assert time.monotonic() < deadline, f"{run_dir}: training did not reach step {n}"
        time.sleep(0.1)


def one_process_losses(store, dp: int) -> list[float]:
    """One process (LocalEngine, as `star-scale train` runs alone) on the global batches of a dp-rank job:
    rank r's loader slice, concatenated in rank order."""
    from star_scale.models.build import build_model
    from star_scale.objectives.module import build_training_module
    from star_scale.train.local_engine import LocalEngine
    from star_scale.train.inputs import open_token_store
    from star_scale.train.loop import seed_everything

    cfg = load_config(RECIPE, overrides(store, "unused"))
    data = open_token_store(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed_everything(cfg.train.seed)
        module = build_training_module(cfg, build_model(cfg, meta=True))
        engine = LocalEngine(module, cfg)
        loaders = [iter(TokenLoader(data, cfg.data.global_batch // dp, views=module.views, rank=r, world_size=dp,
                                    seed=cfg.data.seed, buffer_chunks=cfg.data.shuffle_buffer_chunks, prefetch=0))
                   for r in range(dp)]
        losses = []
        for _ in range(STEPS):
            parts = [next(loader) for loader in loaders]
            losses.append(engine.train_step(torch.cat([b.tokens for b in parts]), torch.cat([b.labels for b in parts]))["loss"])
        return losses
    finally:
        torch.set_num_threads(threads)


def ranks_on_hosts(log: str) -> dict:
    return {int(r): host for r, host in re.findall(r"rank (\d+): \d+ cpus [\d,-]+.*?, host (\S+)", log)}


def job_nodes(cluster, job: str) -> list[str]:
    """NodeList of every job (array task) of this id that ran."""
    out = cluster.run("scontrol", "show", "job", job, "-o").stdout
    return [dict(f.split("=", 1) for f in line.split() if "=" in f)["NodeList"] for line in out.splitlines()]


@pytest.fixture(scope="module")
def zero3_run(two_nodes, store, tmp_path_factory):
    """The uninterrupted 2-node ZeRO-3 run the requeue and node-loss runs must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    job = submit(two_nodes, store, run_dir)
    return finish(two_nodes, job, run_dir), run_dir


def test_zero3_one_task_per_node_equals_one_process(zero3_run, store):
    log, run_dir = zero3_run
    assert "DeepSpeed ZeRO-3" in log and "world 2 = tp 1 x dp 2" in log and "on node[1-2]" in log
    assert ranks_on_hosts(log) == {0: "node1", 1: "node2"}
    losses = [m["loss"] for m in metrics(run_dir)]
    np.testing.assert_allclose(losses, one_process_losses(store, dp=2), rtol=RTOL_ZERO3, atol=0)


def test_tensor_parallel_group_across_the_two_nodes_equals_one_process(two_nodes, store, tmp_path):
    run_dir = tmp_path / "tp"
    refused = two_nodes.run(sys.executable, "-m", "star_scale.cli", "submit", RECIPE,
                            *overrides(store, run_dir, "parallel.tp=2"), "--nodes", "2", check=False)
    assert refused.returncode == 2 and "a tensor-parallel group must sit inside one node" in refused.stderr
    job = submit(two_nodes, store, run_dir, "parallel.tp=2", "cluster.tp_across_nodes=true")
    log = finish(two_nodes, job, run_dir)
    assert "world 2 = tp 2 x dp 1" in log and ranks_on_hosts(log) == {0: "node1", 1: "node2"}
    losses = [m["loss"] for m in metrics(run_dir)]
    np.testing.assert_allclose(losses, one_process_losses(store, dp=1), rtol=RTOL_TP, atol=0)


def test_scontrol_requeue_of_a_2_node_job_resumes_bit_for_bit(two_nodes, zero3_run, store, tmp_path):
    run_dir = tmp_path / "requeued"
    job = submit(two_nodes, store, run_dir)
    wait_steps(run_dir, 7)
    two_nodes.run("scontrol", "requeue", job)
    two_nodes.start_requeued_now(job)
    log = finish(two_nodes, job, run_dir)
    assert "restart 1" in log and "received SIGTERM" in log and "resumed from" in log
    assert metrics(run_dir) and [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in metrics(zero3_run[1])]


def test_node_loss_requeues_and_resumes_bit_for_bit(two_nodes, zero3_run, store, tmp_path):
    run_dir = tmp_path / "node-lost"
    job = submit(two_nodes, store, run_dir)
    wait_steps(run_dir, 7)
    slurmd = int((Path(two_nodes.dir) / "slurmd-node2.pid").read_text())
    killed = two_nodes.node(2, "lose")  # node2's link cut, then its slurmd, step daemon and task killed by PID
    assert re.search(rf"^\s*{slurmd} .*slurmd", killed, re.M) and "star_scale.cli train" in killed, killed
    deadline = time.monotonic() + 60
    while not two_nodes.run("sinfo", "-h", "-n", "node2", "-o", "%T").stdout.startswith("down"):
        assert time.monotonic() < deadline, "node2 was not marked down"
        time.sleep(0.5)
    two_nodes.start_requeued_now(job)  # Slurm requeued the job; released from its ~2 min hold
    assert two_nodes.job_state(job) == "PENDING"  # it needs both nodes: it waits for node2
    two_nodes.node(2, "start")  # the node comes back (ReturnToService=2)
    deadline = time.monotonic() + 60
    while (state := two_nodes.run("sinfo", "-h", "-n", "node2", "-o", "%T").stdout.strip()) not in ("idle", "allocated", "mixed"):
        assert time.monotonic() < deadline, f"node2 did not return ({state}):\n{two_nodes.controller_log()}"
        time.sleep(0.5)
    # About 1 run in 3 here, Slurm 22.05 starts the job with steps that cannot start ("Requested nodes
    # are busy"); the batch script then requeues the job itself once more (cluster.step_start_timeout).
    log = finish(two_nodes, job, run_dir, release=True)  # a hold set again after the node's return is let go
    assert "restart 1" in log and "resumed from" in log
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in metrics(zero3_run[1])]


@pytest.fixture
def prolog_nodes(tmp_path):
    """2 nodes whose prolog (at allocation, PrologFlags=Alloc) waits while the file `hold` exists."""
    if why_not_netns():
        pytest.skip(why_not_netns())
    prolog = tmp_path / "prolog.sh"
    prolog.write_text(f"#!/bin/sh\nwhile [ -e {tmp_path}/hold ]; do sleep 0.2; done\n")
    prolog.chmod(0o755)
    cluster = LocalSlurm(nodes=2, conf=(f"Prolog={prolog}", "PrologFlags=Alloc"))
    yield cluster, tmp_path / "hold"
    cluster.stop()


def test_a_job_whose_steps_cannot_start_requeues_itself_and_resumes(prolog_nodes, zero3_run, store, tmp_path):
    cluster, hold = prolog_nodes
    run_dir = tmp_path / "busy"
    hold.touch()  # the batch script waits for the prolog; meanwhile another step takes every CPU of the job
    job = submit(cluster, store, run_dir)
    deadline = time.monotonic() + 60
    while cluster.job_state(job) != "RUNNING":
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.2)
    hog = subprocess.Popen([str(ROOT / "cluster/local/client.sh"), cluster.dir, "srun", f"--jobid={job}", "--nodes=2",
                            "--ntasks-per-node=1", "sleep", "300"], env=cluster.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        while f"{job}.0 " not in cluster.run("squeue", "-h", "-s", "-j", job, "-o", "%i ").stdout:
            assert time.monotonic() < deadline and hog.poll() is None, "the CPU-holding step did not start"
            time.sleep(0.2)
        hold.unlink()  # the batch script starts: its step waits "Requested nodes are busy", then it requeues
        log = finish(cluster, job, run_dir, release=True)
    finally:
        hog.kill()
        hog.wait()
    assert "srun: Cancelled pending job step" in log  # it never started
    assert f"the training step did not start on node(s) node[1-2] in {STEP_START_S} s" in log
    assert "restart 1" in log
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in metrics(zero3_run[1])]


def test_tokenize_array_spreads_over_both_nodes_and_equals_one_process(two_nodes, tmp_path):
    from star_scale.data.store import open_store
    from star_scale.demo.data import make_demo_images

    job_args = ["--tokenizer", "patch-kmeans:64", "--image-size", "16", "--shard-size", "16", "--fit-images", "64"]
    images = make_demo_images(tmp_path / "images", classes=4, per_class=24, size=18)
    single = tmp_path / "single.zarr"
    subprocess.run([sys.executable, "-m", "tokenize_data", str(images), str(single), *job_args, "--no-progress"],
                   check=True, cwd=ROOT)
    arrayed = tmp_path / "array.zarr"
    words = two_nodes.run(sys.executable, "-m", "star_scale.cli", "submit-tokenize", images, arrayed, "--tasks", "4",
                          "--cpus-per-task", "1", "--time", "00:10:00", *job_args).stdout.split()
    array_job, verify_job = words[words.index("array") + 1], words[words.index("verify") + 2].rstrip(":")
    assert two_nodes.wait(verify_job, timeout=300) == "COMPLETED", [
        p.read_text() for p in (tmp_path / "array.zarr.slurm").glob("*.out")]
    assert set(job_nodes(two_nodes, array_job)) == {"node1", "node2"}
    a, b = open_store(single), open_store(arrayed)
    assert len(a) == len(b) == 96
    for x, y in zip(a.read(0, len(a)), b.read(0, len(b))):
        np.testing.assert_array_equal(x, y)


def test_sweep_array_spreads_over_both_nodes(two_nodes, store, tmp_path):
    out = tmp_path / "sweep"
    submitted = two_nodes.run(sys.executable, "-m", "star_scale.sweep", "submit", "recipes/sweeps/tiny.yaml", *TINY,
                              f"data.path={store}", "data.global_batch=16", "cluster.gpus_per_node=0",
                              "cluster.tasks_per_node=1", "cluster.cpus_per_task=1", "cluster.time=00:10:00",
                              "--set", "grid.sizes.w64=null", "--set", "grid.tokens=[5120]", "--out", out).stdout
    job = submitted.split("submitted array job ")[1].split(":")[0]
    deadline = time.monotonic() + 300
    while two_nodes.run("squeue", "-h", "-j", job, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"sweep array {job} still running"
        time.sleep(1)
    states = [dict(f.split("=", 1) for f in line.split() if "=" in f)["JobState"]
              for line in two_nodes.run("scontrol", "show", "job", job, "-o").stdout.splitlines()]
    assert states == ["COMPLETED", "COMPLETED"], [p.read_text()[-3000:] for p in (out / "logs").glob("*.out")]
    assert sorted(job_nodes(two_nodes, job)) == ["node1", "node2"]
