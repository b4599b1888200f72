"""`star-scale bench memory`: per-rank memory of parameters + optimizer state under ZeRO-3, N = 1 vs N = 2.

One run: two torchrun launches of the same recipe (1 and 2 ranks, TP = 1), each
taking one optimizer step so every optimizer state exists, then counting the
bytes of the distinct tensor storages each rank holds: the student's
parameters (ZeRO-3 partitions, plus parameters DeepSpeed keeps whole) and the
optimizer's fp32 master partitions and AdamW moments.  Gradients and
activations are not counted.  The last line is ``ratio zero3-2/1 = X`` (the
larger rank at N = 2 over the single rank; 0.5 is perfect partitioning).

``--startup`` measures instead the peak resident memory each rank reaches while
building the model, the training module and the engine (over what the process
held after its imports), and prints ``ratio startup-rss-2/1 = Y``: 0.5 would
mean start-up memory is partitioned too; today every rank builds the whole
fp32 model (and ST-AR's teacher copy) before sharding, so Y is near 1.

The default model is preset B (111M parameters) on a 4 x 4 token grid:
parameter memory does not depend on the grid, and at B size the parameters
ZeRO-3 keeps whole (norm weights) are negligible, as at training scale.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def measure(engine) -> dict:
    """Bytes this rank holds for parameters and optimizer state."""
    from star_scale.parallel.zero_state import _master_flats, base_optimizer

    params = []
    for p in engine.module.parameters():
        params += [p.data, getattr(p, "ds_tensor", None)]
    state = [v for s in base_optimizer(engine.ds).state.values() for v in s.values()
             if hasattr(v, "untyped_storage") and v.dim() > 0]
    out = {"params": storage_bytes(params), "optimizer": storage_bytes(_master_flats(engine.ds) + state)}
    if engine.teacher is not None and hasattr(engine.teacher, "masters"):
        out["teacher"] = storage_bytes([p.ds_tensor for p in engine.teacher.params] + engine.teacher.masters)
    return out


def peak_rss() -> int:
    """This process's peak resident memory so far, bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(out: str, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from star_scale.config import load_config
    from star_scale.models.build import build_model
    from star_scale.objectives.module import build_training_module
    from star_scale.parallel.engine import DeepSpeedEngine
    from star_scale.parallel.layout import shutdown

    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(None, overrides, world_size=world)
    torch.manual_seed(0)
    before = peak_rss()
    module = build_training_module(cfg, build_model(cfg))
    engine = DeepSpeedEngine(module, cfg)
    startup = peak_rss() - before
    t = cfg.model.grid_size ** 2
    b = cfg.data.global_batch // engine.dp_size
    engine.train_step(torch.randint(0, cfg.model.vocab_size, (b, module.views, t)), torch.zeros(b, dtype=torch.long))
    ranks = [None] * world
    dist.all_gather_object(ranks, {**measure(engine), "startup_rss": startup})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(ranks))
    shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, overrides: list[str], tmp: Path) -> list[dict]:
    out = tmp / f"ranks{n}.json"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONWARNINGS="ignore", DEEPSPEED_TIMEOUT=os.environ.get("DEEPSPEED_TIMEOUT", "5"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(free_port()), "-m", "star_scale.bench.memory", "--worker", str(out), "--", *overrides]
    log = tmp / f"launch{n}.log"
    with open(log, "w") as f:
        code = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"bench memory: the {n}-rank launch failed ({code}); log above")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="star-scale bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="B", help="model preset (default B)")
    p.add_argument("--grid-size", type=int, default=4, help="tokens per side (memory of weights does not depend on it)")
    p.add_argument("--objective", default="ar", choices=["ar", "star"], help="star also reports the sharded teacher")
    p.add_argument("--startup", action="store_true", help="peak RSS per rank while building model, module and "
                   "engine (N = 1 vs 2); last line `ratio startup-rss-2/1 = Y`")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = p.parse_args(argv)
    overrides = [f"model.preset={args.preset}", f"model.grid_size={args.grid_size}", f"objective.name={args.objective}",
                 "data.global_batch=2", "train.device=cpu", "train.precision=fp32", "parallel.zero_stage=3",
                 "parallel.tp=1", "optimizer.lr_batch=null", *args.overrides]
    if args.worker:
        worker(args.worker, args.overrides)
        return 0
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="bench-memory.") as tmp:
        results = {n: launch(n, overrides, Path(tmp)) for n in (1, 2)}
    if args.startup:
        for n, ranks in results.items():
            for r, m in enumerate(ranks):
                print(f"startup N={n} rank {r}: peak RSS +{m['startup_rss'] / mib:8.1f} MiB")
        peak = {n: max(m["startup_rss"] for m in ranks) for n, ranks in results.items()}
        print(f"ratio startup-rss-2/1 = {peak[2] / peak[1]:.3f}")
        return 0
    totals = {}
    for n, ranks in results.items():
        for r, m in enumerate(ranks):
            extra = f", teacher {m['teacher'] / mib:8.1f} MiB" if "teacher" in m else ""
            print(f"zero3 N={n} rank {r}: params {m['params'] / mib:8.1f} MiB, optimizer {m['optimizer'] / mib:8.1f} MiB, "
                  f"total {(m['params'] + m['optimizer']) / mib:8.1f} MiB{extra}")
        totals[n] = max(m["params"] + m["optimizer"] for m in ranks)
    if "teacher" in results[1][0]:
        print(f"ratio teacher zero3-2/1 = {max(m['teacher'] for m in results[2]) / results[1][0]['teacher']:.3f}")
    print(f"ratio zero3-2/1 = {totals[2] / totals[1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
