"""Per-GPU memory estimate of a recipe's parallel layout (`star-scale plan RECIPE`), and the cheapest layout that fits.

Components, in bytes per rank:
- weights, grads, optimizer: mixed precision on GPU keeps bf16 weights and
  grads plus fp32 master weights and Adam's two moments (2 + 2 + 12 bytes per
  parameter); fp32 on CPU keeps 4 + 4 + 8.  ZeRO stage 1 shards the optimizer
  over data-parallel ranks, 2 also the grads, 3 also the weights; TP splits
  everything by the tensor-parallel size.
- teacher (ST-AR): under ZeRO-3 its fp32 EMA masters plus the bf16 partition
  its forward gathers from (4 + 2 bytes per parameter, sharded); at ZeRO 0-2 a
  whole fp32 copy (4 bytes, split by TP only).
- activations (bf16, per token and block, checked against CPU bf16 autocast on
  the tiny preset): the two RMSNorms keep their fp32 input cast and bf16
  output, and the two dropout masks, unsplit by TP (no sequence parallelism):
  14 x width bytes; q/k/v, the fp32 RoPE casts of q and k, the attention
  output and the SwiGLU intermediates are split: (16 x width + 8 x FFN) / TP.
  The head keeps fp32 logits and their softmax (vocab / TP). Activation
  checkpointing keeps each block's input plus one block's worth during
  recomputation. fp32 on CPU: (12 x width + 4 x FFN) x 4 bytes, as measured.
- autocast copies: bf16 casts of one micro-batch's weights, kept for backward.
- zero3_gather: under ZeRO-3, the full bf16 weights of the layers being
  gathered (one block plus one prefetched; the teacher's too).
- runtime: CUDA context, NCCL buffers and allocator slack (a flat 3 GiB on GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

from star_scale.config import Config
from star_scale.models.build import gpt_args

GIB = 2**30


@dataclass
class MemoryPlan:
    weights: float
    grads: float
    optimizer: float
    teacher: float
    activations: float
    zero3_gather: float
    runtime: float

    @property
    def total(self) -> float:
        return sum(value for _, value in self.rows())

    def rows(self) -> list[tuple[str, float]]:
        return [(k, getattr(self, k)) for k in ("weights", "grads", "optimizer", "teacher", "activations", "zero3_gather", "runtime")]


def count_params(cfg: Config) -> tuple[int, int]:
    """(total parameters, parameters of one block), from shapes only."""
    a = gpt_args(cfg)
    block = 4 * a.width**2 + 3 * a.width * a.ffn_hidden + 2 * a.width
    total = a.layers * block + (a.vocab_size + a.num_classes + 1) * a.width + a.width + a.width * a.vocab_size
    return total, block


def estimate(cfg: Config, gpus: int, gpu: bool = True) -> MemoryPlan:
    a = gpt_args(cfg)
    p = cfg.parallel
    tp, dp = p.tp, max(1, gpus // p.tp)
    n, block = count_params(cfg)
    n_local = n / tp
    w_bytes, g_bytes, opt_bytes = (2, 2, 12) if gpu else (4, 4, 8)
    star = cfg.objective.name == "star"
    views = 2 if star else 1
    micro = cfg.data.micro_batch or cfg.data.global_batch // dp
    tokens = micro * views * a.seq_len
    w, f = a.width, a.ffn_hidden
    if gpu:
        per_block = 14 * w + (16 * w + 8 * f) / tp
        block_input = 2 * w
        casts = n_local * 2
    else:
        per_block = (12 * w + 4 * f) / tp * 4
        block_input = 4 * w
        casts = 0.0
    blocks = (a.layers * block_input + per_block) if p.activation_checkpointing else a.layers * per_block
    head = (4 * w + a.vocab_size / tp) * 4  # fp32 logits and their softmax
    zero3 = p.zero_stage >= 3
    teacher = 0.0
    if star:
        teacher = n_local * (4 + (2 if gpu else 0)) / dp if zero3 else n_local * 4
    return MemoryPlan(
        weights=n_local * w_bytes / (dp if zero3 else 1),
        grads=n_local * g_bytes / (dp if p.zero_stage >= 2 else 1),
        optimizer=n_local * opt_bytes / (dp if p.zero_stage >= 1 else 1),
        teacher=teacher,
        activations=tokens * (blocks + head) + casts,
        zero3_gather=(2 if star else 1) * 2 * block / tp * w_bytes if zero3 and dp > 1 else 0.0,
        runtime=3 * GIB if gpu else 0.0,
    )


def format_plan(cfg: Config, plan: MemoryPlan, gpus: int, limit_gib: float = 80.0) -> str:
    n, _ = count_params(cfg)
    p, d = cfg.parallel, cfg.data
    dp = gpus // p.tp
    micro = d.micro_batch or d.global_batch // dp
    accum = d.global_batch // (dp * micro)
    lines = [
        f"{cfg.name}: {cfg.model.preset} ({n / 1e6:.1f}M params), objective {cfg.objective.name}",
        f"layout: {cfg.cluster.nodes} node(s) x {cfg.cluster.ranks_per_node()} ranks = {gpus}; TP {p.tp} x DP {dp}; "
        f"ZeRO-{p.zero_stage}; micro batch {micro} x {accum} accumulation = global {d.global_batch}; "
        f"activation checkpointing {'on' if p.activation_checkpointing else 'off'}",
    ]
    lines += [f"  {name:<13}{value / GIB:8.2f} GiB" for name, value in plan.rows()]
    verdict = "fits" if plan.total / GIB < limit_gib else "DOES NOT FIT"
    lines.append(f"  {'total':<13}{plan.total / GIB:8.2f} GiB per GPU ({verdict} in {limit_gib:.0f} GB)")
    return "\n".join(lines)


HEADROOM = 0.9  # suggestions leave 10% of the GPU for fragmentation and what the estimate misses
MIN_MICRO = 8  # sequences per micro batch below which a GPU idles on small kernels


def suggest(cfg: Config, gpu_gib: float = 80.0) -> tuple[dict, MemoryPlan]:
    """The cheapest layout of this recipe's ranks that fits: overrides and their plan.

    Cheapest, in order: no activation recompute (+1/3 compute), the smallest TP
    (all-reduces in every block), ZeRO-2 before ZeRO-3 (which gathers the
    weights every step), then the largest micro batch (fewer, fuller kernels).
    ZeRO-1 is not offered: its gradient all-reduce moves the same bytes as
    ZeRO-2's reduce-scatter while keeping whole gradients on every rank.
    """
    gpus, heads = cfg.cluster.world_size(), cfg.model_dims()[1]
    tps = [tp for tp in (1, 2, 4, 8) if heads % tp == 0 and cfg.cluster.ranks_per_node() % tp == 0]
    for smallest in (MIN_MICRO, 1):  # first without micro batches too small to fill a GPU
        found = _search(cfg, gpus, tps, smallest, gpu_gib)
        if found:
            return found
    raise ValueError(f"{cfg.name}: no layout of {gpus} GPUs fits in {gpu_gib:g} GB; add nodes (cluster.nodes)")


def _search(cfg: Config, gpus: int, tps: list[int], smallest: int, gpu_gib: float):
    for recompute in (False, True):
        for tp in tps:
            dp = gpus // tp
            if cfg.data.global_batch % dp:
                continue
            per_rank = cfg.data.global_batch // dp
            micros = [m for m in range(per_rank, 0, -1) if per_rank % m == 0 and m >= min(smallest, per_rank)]
            for stage in (2, 3):
                for micro in micros:
                    over = {"parallel.tp": tp, "parallel.zero_stage": stage, "data.micro_batch": micro,
                            "parallel.activation_checkpointing": recompute}
                    trial = _with(cfg, over)
                    plan = estimate(trial, gpus)
                    if plan.total < HEADROOM * gpu_gib * GIB:
                        return over, plan
    return None


def _with(cfg: Config, overrides: dict) -> Config:
    import copy

    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    return out


def main(argv=None) -> int:
    import argparse

    from star_scale.config import load_config

    ap = argparse.ArgumentParser(prog="star-scale plan", description="Per-GPU memory estimate of a recipe's layout "
                                 "(weights, grads, optimizer, teacher, activations) against the GPU's memory.")
    ap.add_argument("recipes", nargs="+", help="YAML recipes")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory to fit in (default 80)")
    ap.add_argument("--suggest", action="store_true", help="also print the cheapest layout of the recipe's GPUs "
                    "that fits with 10%% headroom: no recompute, then the smallest TP, ZeRO-2 before 3, the "
                    "largest micro batch")
    args = ap.parse_args(argv)
    worst = 0.0
    for r in args.recipes:
        cfg = load_config(r)
        gpus = cfg.cluster.world_size()
        cfg.validate(gpus)
        plan = estimate(cfg, gpus)
        worst = max(worst, plan.total / GIB)
        print(format_plan(cfg, plan, gpus, args.gpu_gib))
        if args.suggest:
            over, best = suggest(cfg, args.gpu_gib)
            same = all(str(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1])).lower() == str(v).lower()
                       for k, v in over.items())
            print(f"  suggested: {' '.join(f'{k}={v}' for k, v in over.items())} ({best.total / GIB:.2f} GiB)"
                  + (" = this recipe" if same else ""))
    return 0 if worst < args.gpu_gib else 1
