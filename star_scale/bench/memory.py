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
held after its imports), for N = 1, N = 2 and N = 2 as one TP = 2 group, and prints
``ratio startup-rss-tp2/1`` and last ``ratio startup-rss-2/1 = Y``: 0.5 would
mean start-up memory is partitioned as well as the weights.  The model is built
on the meta device, as the trainer builds it, and allocated one unit at a time,
each ZeRO-3 partitioned before the next (parallel/zero_init.py).

``--checkpoint`` saves one checkpoint (synchronously, then asynchronously) and loads it back,
and prints per rank the bytes it wrote, the wall time of each save (for the asynchronous one,
how long training was held), and the peak resident memory each save and the load added over
what the rank held before, beside the whole unsharded state (fp32 weights, AdamW moments,
teacher); the last line is ``ratio ckpt-bytes-per-rank-2/1 = X`` (0.5: every rank writes
only its share).

``--state`` takes a second step by hand and prints, per N, the peak bytes both engines held during it
(every tensor they reach: weights, grads, fp32 masters, moments, reduce buckets, gathered ZeRO-3
weights, teacher; bench/engine_bytes.py) beside `star-scale plan`'s byte model of the same config.

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
import time
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak resident memory added during a block, from the kernel's high-water mark (reset on entry)."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.added = (_status_kib("VmHWM") - self.base) * 1024


def checkpoint_costs(engine, folder: Path) -> dict:
    """Bytes this rank writes per checkpoint, seconds per save (sync, and held by an async one), peak RSS added."""
    import torch.distributed as dist

    from star_scale.parallel import checkpoint as dist_ckpt
    from star_scale.parallel.zero_state import shape_of
    from star_scale.train.checkpoint import CheckpointDir

    rank, out = dist.get_rank(), {}
    whole = sum(shape_of(p).numel() for p in engine.module.parameters()) * 12  # fp32 weight + 2 moments
    if engine.teacher is not None:
        whole += sum(shape_of(p).numel() for p in engine.teacher.model.parameters()) * 4
    out["whole_state"] = whole
    ckpts = CheckpointDir(folder, keep=3)
    for mode, step in (("sync", 1), ("async", 2)):
        dist.barrier()
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            dist_ckpt.save(engine, ckpts, step, {"step": step}, asynchronous=mode == "async")
            out[f"{mode}_held_s"] = time.perf_counter() - t0
            dist_ckpt.wait(engine)
            out[f"{mode}_total_s"] = time.perf_counter() - t0
        out[f"{mode}_peak_rss"] = peak.added
    out["ckpt_bytes"] = sum(f.stat().st_size for f in ckpts.path(1).rglob(f"rank_{rank:05d}.*"))
    dist.barrier()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        dist_ckpt.load_latest(engine, ckpts)
        out["load_s"] = time.perf_counter() - t0
    out["load_peak_rss"] = peak.added
    return out


def state_step(engine, module, b: int, t: int) -> dict:
    """A second step by hand (the moments exist by now): the peak of every tensor both engines hold,
    and of the gathered ZeRO-3 weights, during it."""
    import torch

    from star_scale.bench.engine_bytes import Peak

    tokens = torch.randint(0, engine.cfg.model.vocab_size, (engine.micro_batch, module.views, t))
    labels = torch.zeros(engine.micro_batch, dtype=torch.long)
    with Peak(engine) as peak:
        for _ in range(engine.accumulation):
            loss, _ = engine.ds(tokens, labels)
            engine.ds.backward(loss)
            peak.sample()
        engine.ds.step()
    return {"held_peak": peak.held, "gather_peak": peak.gathered}


def worker(out: str, overrides: list[str], checkpoint: bool = False, state: bool = False) -> None:
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
    module = build_training_module(cfg, build_model(cfg, meta=True))  # as the trainer builds it
    engine = DeepSpeedEngine(module, cfg)
    startup = peak_rss() - before
    t = cfg.model.grid_size ** 2
    b = cfg.data.global_batch // engine.dp_size
    engine.train_step(torch.randint(0, cfg.model.vocab_size, (b, module.views, t)), torch.zeros(b, dtype=torch.long))
    costs = checkpoint_costs(engine, Path(out).with_suffix(".ckpt")) if checkpoint else {}
    if state:
        costs = state_step(engine, module, b, t)
    ranks = [None] * world
    dist.all_gather_object(ranks, {**measure(engine), "startup_rss": startup, **costs})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(ranks))
    shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, overrides: list[str], tmp: Path, checkpoint: bool = False, tag: str = "",
           state: bool = False) -> list[dict]:
    out = tmp / f"ranks{n}{tag}.json"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONWARNINGS="ignore", DEEPSPEED_TIMEOUT=os.environ.get("DEEPSPEED_TIMEOUT", "5"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(free_port()), "-m", "star_scale.bench.memory", "--worker", str(out), *(["--checkpoint"] if checkpoint else []),
           *(["--state"] if state else []), "--",
           *overrides]
    log = tmp / f"launch{n}{tag}.log"
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
                   "engine (N = 1 vs 2, and 2 as TP = 2); last line `ratio startup-rss-2/1 = Y`")
    p.add_argument("--checkpoint", action="store_true", help="bytes written per rank, seconds per save (sync and "
                   "async) and peak RSS added by save and load (N = 1 vs 2); last line "
                   "`ratio ckpt-bytes-per-rank-2/1 = X`")
    p.add_argument("--state", action="store_true", help="every tensor each rank's engine holds after its last "
                   "backward (weights, grads, masters, moments, buckets, teacher) and the peak of gathered ZeRO-3 "
                   "weights, in bytes per parameter, beside `star-scale plan`'s byte model (N = 1 vs 2)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = p.parse_args(argv)
    overrides = [f"model.preset={args.preset}", f"model.grid_size={args.grid_size}", f"objective.name={args.objective}",
                 "data.global_batch=2", "train.device=cpu", "train.precision=fp32", "parallel.zero_stage=3",
                 "parallel.tp=1", "optimizer.lr_batch=null", *args.overrides]
    if args.worker:
        worker(args.worker, args.overrides, args.checkpoint, args.state)
        return 0
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="bench-memory.") as tmp:
        results = {n: launch(n, overrides, Path(tmp), args.checkpoint, state=args.state) for n in (1, 2)}
        if args.startup:  # and 2 ranks as one TP = 2 group (megatron layers, dp = 1)
            tp2 = launch(2, overrides + ["parallel.tp=2"], Path(tmp), tag="tp2")
    if args.checkpoint:
        for n, ranks in results.items():
            for r, m in enumerate(ranks):
                print(f"checkpoint N={n} rank {r}: writes {m['ckpt_bytes'] / mib:8.1f} MiB | save {m['sync_total_s']:.2f} s"
                      f" | async save holds training {m['async_held_s']:.2f} s of {m['async_total_s']:.2f} s | load "
                      f"{m['load_s']:.2f} s | peak RSS added: save {m['sync_peak_rss'] / mib:.1f}, async "
                      f"{m['async_peak_rss'] / mib:.1f}, load {m['load_peak_rss'] / mib:.1f} MiB (whole state "
                      f"{m['whole_state'] / mib:.1f} MiB)")
        worst = {k: max(m[f"{k}_peak_rss"] / m["whole_state"] for m in results[2]) for k in ("sync", "async", "load")}
        # An asynchronous save holds a host copy of the rank's own share (1/N of the state) while it writes.
        print(f"peak RSS added / whole state, N=2: save {worst['sync']:.3f}, async save {worst['async']:.3f}, "
              f"load {worst['load']:.3f}")
        per_rank = {n: max(m["ckpt_bytes"] for m in ranks) for n, ranks in results.items()}
        print(f"ratio ckpt-bytes-per-rank-2/1 = {per_rank[2] / per_rank[1]:.3f}")
        return 0
    if args.state:
        from star_scale.bench.engine_bytes import compare_plan

        for n, ranks in results.items():
            print(compare_plan(overrides, n, ranks))
        return 0
    if args.startup:
        for n, ranks in results.items():
            for r, m in enumerate(ranks):
                print(f"startup N={n} rank {r}: peak RSS +{m['startup_rss'] / mib:8.1f} MiB")
        for r, m in enumerate(tp2):
            print(f"startup N=2 TP=2 rank {r}: peak RSS +{m['startup_rss'] / mib:8.1f} MiB")
        peak = {n: max(m["startup_rss"] for m in ranks) for n, ranks in results.items()}
        print(f"ratio startup-rss-tp2/1 = {max(m['startup_rss'] for m in tp2) / peak[1]:.3f}")
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
