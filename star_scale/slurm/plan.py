"""Per-GPU memory estimate of a recipe's parallel layout (`star-scale plan RECIPE`), and the cheapest layout that fits.

Components, in bytes per rank, as the engines hold them (measured on CPU with the real
engines, `star-scale bench memory --state`; tests/dist/test_plan_bytes.py):
- weights, grads, optimizer: bf16 runs keep fp32 weights and grads under autocast
  (parallel/ds_config.py), and ZeRO 1-3 their own fp32 master copy beside Adam's two
  moments: 4 + 4 + 4 + 8 bytes per parameter (LocalEngine and ZeRO-0: no master).
  ``parallel.bf16_weights``: 2 + 4 + 4 + 8 (bf16 weights; ZeRO-2 keeps the
  gradient partition in fp32, ZeRO-3 in bf16: 2 + 2 + 4 + 8).  ZeRO stage 1 shards masters and moments over
  data-parallel ranks, 2 also the grads, 3 also the weights; TP splits everything.
  ZeRO 2-3 also hold, during backward, the largest parameter's whole gradient
  (ZeRO-2 with bf16 weights: its fp32 cast of the rank's part).
- teacher (ST-AR): at ZeRO 0-2 a whole fp32 copy (split by TP only); under ZeRO-3
  its fp32 partitions (bf16 weights: bf16 partitions plus fp32 EMA masters).
- buckets: ZeRO 1-3 allocate ``reduce_bucket_size`` gradient elements during backward,
  twice with ``overlap_comm`` (on GPU).  ZeRO-2's all-gather writes into the flat
  weights in place (no bucket of its own).
- zero3_gather: under ZeRO-3 each engine (student, teacher) keeps up to
  ``stage3_max_live_parameters`` whole weights alive (at least the largest parameter)
  plus one prefetch bucket, and only whole models up to ``stage3_max_reuse_distance``
  stay live between uses: min(model, max(max_live, largest) + prefetch) elements each.
  Sizes come from the generated DeepSpeed config (parallel.deepspeed_config included).
- activations (bf16, per token and block, checked against CPU bf16 autocast on
  the tiny preset): the two RMSNorms keep their fp32 input cast and bf16
  output, and the two dropout masks, unsplit by TP (no sequence parallelism):
  14 x width bytes; q/k/v, the fp32 RoPE casts of q and k, the attention
  output and the SwiGLU intermediates are split: (16 x width + 8 x FFN) / TP.
  The head keeps fp32 logits and their softmax (vocab / TP). Activation
  checkpointing keeps each block's input plus one block's worth during
  recomputation. fp32 on CPU: (12 x width + 4 x FFN) x 4 bytes, as measured.
- autocast copies: bf16 casts of one micro-batch's weights, kept for backward
  (none with bf16 weights).
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
    buckets: float
    zero3_gather: float
    runtime: float

    @property
    def total(self) -> float:
        return sum(value for _, value in self.rows())

    def rows(self) -> list[tuple[str, float]]:
        return [(k, getattr(self, k)) for k in ("weights", "grads", "optimizer", "teacher", "activations", "buckets",
                                                 "zero3_gather", "runtime")]

    def states(self) -> float:
        """What `bench memory --state` measures: everything but activations and the runtime allowance."""
        return self.total - self.activations - self.runtime


def count_params(cfg: Config) -> tuple[int, int]:
    """(total parameters, parameters of one block), from shapes only."""
    a = gpt_args(cfg)
    block = 4 * a.width**2 + 3 * a.width * a.ffn_hidden + 2 * a.width
    total = a.layers * block + (a.vocab_size + a.num_classes + 1) * a.width + a.width + a.width * a.vocab_size
    return total, block


def largest_param(cfg: Config) -> int:
    """Elements of the largest single parameter (token embedding or head, a fused qkv, an FFN matrix)."""
    a = gpt_args(cfg)
    return max(a.vocab_size * a.width, 3 * a.width**2, a.width * a.ffn_hidden)


def _zero_sizes(cfg: Config, dp: int, gpu: bool) -> dict:
    """The generated DeepSpeed config's zero_optimization (the recipe's deepspeed_config merged in)."""
    import torch

    from star_scale.parallel.ds_config import student_config

    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and gpu)
    ds = student_config(cfg, dp, torch.bfloat16 if bf16 else torch.float32, torch.device("cuda" if gpu else "cpu"))
    return ds["zero_optimization"]


def estimate(cfg: Config, gpus: int, gpu: bool = True, deepspeed: bool | None = None) -> MemoryPlan:
    """deepspeed: the engine, as the trainer picks it (None: DeepSpeed for more than one rank or TP > 1)."""
    a = gpt_args(cfg)
    p = cfg.parallel
    tp, dp = p.tp, max(1, gpus // p.tp)
    n, block = count_params(cfg)
    n_local = n / tp
    stage = p.zero_stage
    if deepspeed is None:  # one process: LocalEngine (no ZeRO, no master)
        deepspeed = gpus > 1 or tp > 1
    bf16w = p.bf16_weights and deepspeed
    w_bytes = 2 if bf16w else 4
    g_bytes = 2 if bf16w and stage >= 3 else 4  # bf16 weights: ZeRO-2 reduces into an fp32 partition, ZeRO-3 not
    master = 4 if deepspeed and stage >= 1 else 0
    star = cfg.objective.name == "star"
    views = 2 if star else 1
    micro = cfg.data.micro_batch or cfg.data.global_batch // dp
    tokens = micro * views * a.seq_len
    w, f = a.width, a.ffn_hidden
    if gpu:
        per_block = 14 * w + (16 * w + 8 * f) / tp
        block_input = 2 * w
        casts = 0.0 if bf16w else n_local * 2
    else:
        per_block = (12 * w + 4 * f) / tp * 4
        block_input = 4 * w
        casts = 0.0
    blocks = (a.layers * block_input + per_block) if p.activation_checkpointing else a.layers * per_block
    head = (4 * w + a.vocab_size / tp) * 4  # fp32 logits and their softmax
    zero3 = stage >= 3
    z = _zero_sizes(cfg, dp, gpu) if deepspeed else {}
    largest = largest_param(cfg) / tp
    grads = n_local * g_bytes / (dp if stage >= 2 else 1)
    if deepspeed and stage >= 2:  # the largest gradient, whole (ZeRO-2 bf16 weights: the fp32 cast of this rank's part)
        grads += largest * (g_bytes if stage >= 3 else 4 / dp) if bf16w else largest * 4
    buckets = 0.0
    if deepspeed and stage >= 1:
        buckets = z["reduce_bucket_size"] * (2 if z.get("overlap_comm") else 1) * (2 if bf16w else 4)
    teacher = gather = 0.0
    if zero3 and dp > 1:
        window = min(n_local, max(z["stage3_max_live_parameters"], largest) + z["stage3_prefetch_bucket_size"])
        gather = window * w_bytes * (2 if star else 1)
    if star:
        teacher = n_local * (w_bytes + (4 if bf16w else 0)) / dp if zero3 else n_local * 4
    return MemoryPlan(
        weights=n_local * w_bytes / (dp if zero3 else 1),
        grads=grads,
        optimizer=n_local * (master + 8) / (dp if stage >= 1 else 1),
        teacher=teacher,
        activations=tokens * (blocks + head) + casts,
        buckets=buckets,
        zero3_gather=gather,
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
        f"activation checkpointing {'on' if p.activation_checkpointing else 'off'}; "
        f"weights {'bf16 (fp32 masters)' if p.bf16_weights else 'fp32 (bf16 autocast)'}",
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
    (all-reduces in every block), fp32 weights under autocast (one process's numerics)
    before ``parallel.bf16_weights`` (less memory and traffic, bf16-rounded weights), ZeRO-2
    before ZeRO-3 (which gathers the weights every step), then the largest micro batch
    (fewer, fuller kernels).
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
    weights = (False, True) if cfg.train.precision != "fp32" else (False,)
    for recompute in (False, True):
        for tp in tps:
            dp = gpus // tp
            if cfg.data.global_batch % dp:
                continue
            per_rank = cfg.data.global_batch // dp
            micros = [m for m in range(per_rank, 0, -1) if per_rank % m == 0 and m >= min(smallest, per_rank)]
            for bf16w in weights:
                for stage in (2, 3):
                    for micro in micros:
                        over = {"parallel.tp": tp, "parallel.zero_stage": stage, "data.micro_batch": micro,
                                "parallel.activation_checkpointing": recompute, "parallel.bf16_weights": bf16w}
                        plan = estimate(_with(cfg, over), gpus)
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
                    "that fits with 10%% headroom: no recompute, the smallest TP, fp32 weights before bf16 "
                    "weights, ZeRO-2 before 3, the largest micro batch")
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
