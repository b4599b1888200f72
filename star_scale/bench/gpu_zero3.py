"""The ZeRO-3 smoke step of `bench gpu`: one process as a world of 1 (NCCL on CUDA, gloo on CPU).

Run as its own process (``python -m star_scale.bench.gpu_zero3``) so the
process group, DeepSpeed and megatron-core never touch the model benches; it
prints one JSON line.  A machine without DeepSpeed reports that and exits 0.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke() -> dict:
    try:
        import deepspeed  # noqa: F401
        import megatron.core  # noqa: F401
    except Exception as e:
        return {"status": "skipped", "reason": f"{type(e).__name__}: {e}"[:120]}
    import torch
    import torch.distributed as dist

    from star_scale.config import load_config
    from star_scale.models.build import build_model
    from star_scale.objectives.module import build_training_module
    from star_scale.parallel.engine import DeepSpeedEngine
    from star_scale.parallel.layout import shutdown

    cfg = load_config(None, ["model.preset=tiny", "model.vocab_size=64", "model.num_classes=4", "model.grid_size=4",
                             "objective.name=star", "data.global_batch=4", "parallel.tp=1", "parallel.zero_stage=3"],
                      world_size=1)
    torch.manual_seed(0)
    engine = DeepSpeedEngine(build_training_module(cfg, build_model(cfg)), cfg)
    tokens = torch.randint(0, 64, (4, 2, 16))
    labels = torch.randint(0, 4, (4,))
    t0 = time.perf_counter()
    losses = [engine.train_step(tokens, labels)["loss"] for _ in range(2)]
    out = {"status": "ok", "backend": dist.get_backend(), "device": str(engine.device), "zero_stage": engine.zero_stage,
           "losses": losses, "step_s": (time.perf_counter() - t0) / 2}
    shutdown()
    return out


def run(timeout: float = 240) -> dict:
    """The smoke step in a fresh process; its JSON, or the failure's last lines."""
    # This interpreter's bin first on PATH: DeepSpeed JIT-builds ops with the first ninja found, and a
    # different one than last time rebuilds them (minutes on CPU).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PATH=path)
    try:
        out = subprocess.run([sys.executable, "-m", "star_scale.bench.gpu_zero3"], env=env, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"no result within {timeout:.0f}s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"status": "failed", "reason": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1][:160]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(smoke()))
