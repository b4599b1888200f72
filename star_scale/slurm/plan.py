"""Per-GPU memory estimate of a recipe's parallel layout (`star-scale plan RECIPE`).

Components, in bytes per rank:
- weights, grads, optimizer: mixed precision on GPU keeps bf16 weights and
  grads plus fp32 master weights and Adam's two moments (2 + 2 + 12 bytes per
  parameter); fp32 on CPU keeps 4 + 4 + 8.  ZeRO stage 1 shards the optimizer
  over data-parallel ranks, 2 also the grads, 3 also the weights; TP splits
  everything by the tensor-parallel size.
- teacher (ST-AR): fp32 EMA weights, sharded like the student's weights under
  ZeRO-3 (and TP).
- activations: measured on this model: a block saves about 12 x width + 4 x FFN
  hidden values per token (norms, q/k/v, attention output, SwiGLU, dropout
  masks), the head saves 4 x width + vocab; activation checkpointing keeps only
  each block's input plus one block's worth during recomputation.
- zero3_gather: under ZeRO-3, the full bf16 weights of the layers being
  gathered (one block plus one prefetched).
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
    act_bytes = 2 if gpu else 4
    per_block = (12 * a.width + 4 * a.ffn_hidden) / tp * act_bytes
    if p.activation_checkpointing:
        blocks = a.layers * a.width * act_bytes + per_block
    else:
        blocks = a.layers * per_block
    head = (4 * a.width + a.vocab_size / tp) * 4  # fp32 logits and their softmax
    return MemoryPlan(
        weights=n_local * w_bytes / (dp if p.zero_stage >= 3 else 1),
        grads=n_local * g_bytes / (dp if p.zero_stage >= 2 else 1),
        optimizer=n_local * opt_bytes / (dp if p.zero_stage >= 1 else 1),
        teacher=(n_local * 4 / (dp if p.zero_stage >= 3 else 1)) if star else 0.0,
        activations=tokens * (blocks + head),
        zero3_gather=2 * block / tp * w_bytes if p.zero_stage >= 3 and dp > 1 else 0.0,
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


def main(argv=None) -> int:
    import argparse

    from star_scale.config import load_config

    ap = argparse.ArgumentParser(prog="star-scale plan", description="Per-GPU memory estimate of a recipe's layout "
                                 "(weights, grads, optimizer, teacher, activations) against the GPU's memory.")
    ap.add_argument("recipes", nargs="+", help="YAML recipes")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory to fit in (default 80)")
    args = ap.parse_args(argv)
    worst = 0.0
    for r in args.recipes:
        cfg = load_config(r)
        gpus = cfg.cluster.world_size()
        cfg.validate(gpus)
        plan = estimate(cfg, gpus)
        worst = max(worst, plan.total / GIB)
        print(format_plan(cfg, plan, gpus, args.gpu_gib))
    return 0 if worst < args.gpu_gib else 1
