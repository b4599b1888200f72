"""The measurements of `bench gpu`, each a list of table rows; they need torch and the project only.

- ``train_rows``: one LocalEngine optimizer step of a preset (AR, ST-AR) in
  bf16: tokens/s, MFU against the spec-sheet peak, the allocator's peak memory
  next to `star-scale plan`'s estimate (without its flat runtime allowance).
- ``attention_rows``: the MIM student's masked attention per backend: forward
  + backward time and max error against an fp32 math reference.
- ``sampling_rows``: KV-cache generation at CFG 2.0: images/s per batch size.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Optional

import torch

from star_scale.config import Config
from star_scale.models import attention
from star_scale.models.build import build_model
from star_scale.models.generate import generate
from star_scale.objectives.module import build_training_module
from star_scale.train.local_engine import LocalEngine
from star_scale.train.throughput import device_name, peak_flops

GIB = 2**30


@dataclass
class Size:
    """What one run of the bench measures (the full GPU size, or the reduced CPU one)."""

    presets: tuple
    images: int  # images per training step (ST-AR: 2 views each; AR gets 2x the sequences)
    steps: int
    grid: int
    vocab: int
    attention_shape: tuple  # (sequences, heads, positions)
    head_dims: tuple
    sample_batches: tuple
    sample_preset: str


GPU_SIZE = Size(("B", "L", "XL"), 32, 5, 16, 16384, (64, 16, 256), (64, 100), (32, 64, 128, 256), "B")
CPU_SIZE = Size(("tiny",), 2, 2, 8, 1024, (4, 2, 65), (16, 20), (2, 4), "tiny")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(preset: str, objective: str, images: int, size: Size, device: torch.device, layers=None) -> Config:
    cfg = Config(name=f"bench-gpu-{preset}-{objective}")
    cfg.model.preset, cfg.model.layers = preset, layers
    cfg.model.grid_size, cfg.model.vocab_size = size.grid, size.vocab
    cfg.objective.name = objective
    cfg.data.global_batch = images if objective == "star" else 2 * images  # same sequences per step
    cfg.train.device = device.type
    cfg.train.precision = "bf16" if device.type == "cuda" else "fp32"
    return cfg.validate()


def _fits(cfg: Config, device: torch.device) -> tuple[bool, float]:
    from star_scale.slurm.plan import estimate

    plan = estimate(cfg, gpus=1, gpu=device.type == "cuda")
    need = plan.total - plan.runtime
    if device.type != "cuda":
        return True, need
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.85 * free, need


def train_row(preset: str, objective: str, size: Size, device: torch.device) -> dict:
    """Full depth when `plan` says it fits, else the deepest halving that does."""
    layers = None
    cfg = bench_config(preset, objective, size.images, size, device)
    ok, planned = _fits(cfg, device)
    while not ok and cfg.model_dims()[0] > 1:
        layers = max(1, cfg.model_dims()[0] // 2)
        cfg = bench_config(preset, objective, size.images, size, device, layers)
        ok, planned = _fits(cfg, device)
    with torch.device(device):  # initialise on the device: no host copy of 775M parameters
        torch.manual_seed(0)
        module = build_training_module(cfg, build_model(cfg))
    engine = LocalEngine(module, cfg)
    views, t = module.views, cfg.model.grid_size**2
    n = cfg.data.global_batch
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (n, views, t), device=device, generator=g)
    labels = torch.randint(0, cfg.model.num_classes, (n,), device=device, generator=g)
    engine.train_step(tokens, labels)  # warm-up: allocator, kernels, the masked backend's pick
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(size.steps):
        engine.train_step_lazy(tokens, labels)
    sync(device)
    dt = (time.perf_counter() - t0) / size.steps
    tok_s = n * views * t / dt
    peak = peak_flops(device_name(device))
    flops = module.student.flops_per_token() * getattr(module, "flops_factor", 1.0)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    row = {"preset": preset, "objective": objective, "layers": cfg.model_dims()[0], "sequences": n * views,
           "step_s": dt, "tokens_per_s": tok_s, "mfu": tok_s * flops / peak if peak else None,
           "memory_gib": memory / GIB if memory is not None else None, "plan_gib": planned / GIB}
    del engine, module, tokens, labels
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def past(until: Optional[float]) -> bool:
    """A section's rows stop starting at its deadline (``time.monotonic()``); the row in flight finishes."""
    return until is not None and time.monotonic() > until


def train_rows(size: Size, device: torch.device, until: Optional[float] = None) -> list[dict]:
    return [{"preset": p, "objective": o, "over_budget": True} if past(until) else train_row(p, o, size, device)
            for p in size.presets for o in ("ar", "star")]


def attention_rows(size: Size, device: torch.device, until: Optional[float] = None) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = attention.MASKED_BACKENDS if device.type == "cuda" else ("sdpa", "sdpa-math", "flex")
    rows = []
    for d in size.head_dims:
        for backend in backends:
            if past(until):
                rows.append({"head_dim": d, "backend": backend, "over_budget": True})
                continue
            try:
                s, err = attention.time_masked(backend, *size.attention_shape, d, dtype, device)
                rows.append({"head_dim": d, "backend": backend, "ms": 1e3 * s, "max_err": err})
            except Exception as e:  # a kernel that rejects the shape: reported, not fatal
                rows.append({"head_dim": d, "backend": backend, "error": f"{type(e).__name__}: {e}"[:80]})
    return rows


def sampling_rows(size: Size, device: torch.device, until: Optional[float] = None) -> list[dict]:
    cfg = bench_config(size.sample_preset, "ar", 1, size, device)
    with torch.device(device):
        torch.manual_seed(0)
        model = build_model(cfg).eval()
    rows = []
    for batch in size.sample_batches:
        if past(until):
            rows.append({"batch": batch, "over_budget": True})
            continue
        labels = torch.arange(batch, device=device) % cfg.model.num_classes
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            generate(model, labels[:2], cfg_scale=2.0)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            generate(model, labels, cfg_scale=2.0)
            sync(device)
        rows.append({"batch": batch, "images_per_s": batch / (time.perf_counter() - t0)})
    return rows
