"""Two ranks agreeing on host-side choices: the masked-attention backend, a stop signal, an asynchronous save.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/agreement_worker.py OUT_DIR

Writes agreements.rankR.json for tests/dist/test_agreements.py.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from star_scale.models import attention  # noqa: E402
from star_scale.parallel import checkpoint as dist_ckpt  # noqa: E402
from star_scale.parallel.attention_choice import agree_masked_attention  # noqa: E402
from star_scale.parallel.engine import DeepSpeedEngine  # noqa: E402
from star_scale.parallel.layout import init_layout, shutdown  # noqa: E402
from star_scale.train.checkpoint import CheckpointDir  # noqa: E402
from star_scale.train.errors import CheckpointWriteError  # noqa: E402
from star_scale.train.preemption import StopSignals  # noqa: E402


def masked_choice(rank: int) -> dict:
    """Each rank's timer prefers another backend; every rank must end with rank 0's."""
    cfg = common.config("star", "data.micro_batch=2", world=2)
    module = common.build(cfg)
    fastest = "sdpa-math" if rank == 0 else "flex"
    timed = []

    def timer(backend, shape, dtype, device):
        timed.append([shape.batch, shape.heads, shape.seq, shape.head_dim])
        return 1.0 if backend == fastest else 2.0

    gpu = torch.device("cuda", 0)  # the timer never touches it: CUDA's choice, made on a CPU machine
    choice = agree_masked_attention(module, 2, 1, gpu, torch.bfloat16, timer=timer)
    a = module.student.args
    return {"choice": choice, "used": attention.pick_masked(gpu, a.head_dim, torch.bfloat16), "timed": timed,
            "expected_shape": [2 * 2, a.heads, a.grid_size ** 2, a.head_dim]}


def stop_signal(rank: int) -> dict:
    """Rank 1 alone gets SIGTERM at step 7; training collectives run every step in between."""
    stop = StopSignals()
    try:
        for step in range(1, 41):
            dist.all_reduce(torch.ones(4))  # a step's own collectives, interleaved with the agreement
            if step == 7 and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            if stop.should_stop(torch.device("cpu"), step, every=5):
                return {"stopped_at": step, "signal": stop.signal_name}
        return {"stopped_at": None, "signal": stop.signal_name}
    finally:
        stop.restore()


def async_saves(rank: int, out: Path) -> dict:
    """An asynchronous save committed by poll(); then one whose write failed on rank 1 only."""
    cfg = common.config("star", "train.async_save=true", "train.stop_check_every=2", world=2)
    module = common.build(cfg)
    engine = DeepSpeedEngine(module, cfg)
    ckpts = CheckpointDir(out / "ckpt")
    batches = iter(common.batches(12, module.views))
    result = {}
    for step, name in ((1, "committed_at_poll"), (2, "failed_at_poll")):
        engine.train_step(*common.rank_slice(next(batches), engine.dp_rank, engine.dp_size))
        dist_ckpt.save(engine, ckpts, step, {"step": step}, asynchronous=True)
        job = engine.pending_save
        job.thread.join()  # written on every rank before the first agreement: the commit poll is known
        if step == 2 and rank == 1:
            job.result = {"error": "rank 1 could not write (injected)"}
        for poll in range(1, 7):
            engine.train_step(*common.rank_slice(next(batches), engine.dp_rank, engine.dp_size))
            try:
                engine.poll_checkpoint()
            except CheckpointWriteError as e:
                result[name], result["error"] = poll, str(e)
                break
            if engine.pending_save is None:
                result[name] = poll
                break
    result["steps"] = ckpts.steps()
    dist.barrier()  # rank 0 removes the failed save's temporary folder
    result["leftovers"] = sorted(p.name for p in ckpts.root.iterdir() if p.name.startswith(".tmp"))
    return result


def main() -> None:
    out = Path(sys.argv[1])
    init_layout(1, "cpu")
    rank = dist.get_rank()
    results = {"masked": masked_choice(rank), "stop": stop_signal(rank), "saves": async_saves(rank, out)}
    (out / f"agreements.rank{rank}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
