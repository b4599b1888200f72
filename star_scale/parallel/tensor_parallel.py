"""Megatron-core tensor parallelism for star-scale's own GPT.

The GPT asks a factory for its layers (``linear(in, out, kind=...)``,
``embedding(num, dim)``); ``LayerFactory`` answers with plain torch layers at
TP = 1 and megatron-core's parallel layers at TP > 1:

- ``column`` (w1, w3), ``qkv`` (wqkv), ``head`` (output): ColumnParallelLinear,
  output dimension sharded, output left sharded (no gather_output: the next
  layer is row-parallel, and the head's logits stay vocab-sharded for
  vocab_parallel_cross_entropy).
- ``row`` (wo, w2): RowParallelLinear, input dimension sharded, output all-reduced.
- embeddings: VocabParallelEmbedding when the table divides by TP, else a
  replicated nn.Embedding (the class table has num_classes + 1 rows).

wqkv's rows are [q | k | v], each head-major.  A plain column split would give
rank 0 all of q; instead wqkv is split with stride 3 (megatron's convention):
rank r holds [q_r | k_r | v_r], its own heads' q, k and v, so the GPT's
``unflatten(3, heads, head_dim)`` works unchanged on the local rows.

Weights are never initialised by megatron (perform_initialization=False): each
rank's shard is cut from the whole TP = 1 value of that one parameter, either
the given model's or its seeded initial value (``GPT.initial_value``, for a
model built on the meta device), so a run starts from the same weights
whatever the layout, and no rank ever builds the whole model.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           vocab_parallel_cross_entropy)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from star_scale.models.build import materialize
from star_scale.models.gpt import GPT, plain_linear
from star_scale.parallel.shard_files import shard, unshard  # noqa: F401  (the TP split, torch only)

log = logging.getLogger(__name__)


def _no_init(weight: torch.Tensor) -> None:
    pass  # weights are copied from the full model (see module docstring)


def megatron_config(tp: int) -> ModelParallelConfig:
    # use_cpu_initialization on every device: megatron then allocates with a plain torch.empty, which
    # the meta-device context of ``to_tensor_parallel`` keeps unallocated; without it megatron puts
    # every weight on torch.cuda.current_device() at construction, the whole TP-local model at once.
    # Megatron initialises nothing (perform_initialization=False), so the flag changes nothing else.
    # No gradient-accumulation fusion (needs apex CUDA kernels, and DeepSpeed owns the gradients
    # anyway), no sequence parallelism.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, gradient_accumulation_fusion=False,
                               sequence_parallel=False, params_dtype=torch.float32)


def _mark(weight: torch.Tensor, dim: int, stride: int) -> None:
    # Megatron sets these only when it initialises; DeepSpeed reads `tensor_model_parallel`
    # to count each shard once in the global gradient norm.
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(weight, attr):
            delattr(weight, attr)
    set_tensor_model_parallel_attributes(weight, True, dim, stride)


class ColumnLinear(ColumnParallelLinear):
    """y_local = x W_local^T; the weight keeps nn.Linear's name and layout, only its rows are local."""

    def __init__(self, in_features: int, out_features: int, config, stride: int = 1, vocab: bool = False):
        super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=False,
                         gather_output=False, stride=stride)
        _mark(self.weight, 0, stride)
        self.vocab_parallel = vocab

    def forward(self, x):  # megatron returns (output, bias)
        return super().forward(x)[0]

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over vocab-sharded logits (the head's own loss)."""
        # vocab_parallel_cross_entropy rewrites its input in place: the logits are spent after this.
        return vocab_parallel_cross_entropy(logits.float(), targets).mean()


class RowLinear(RowParallelLinear):
    def __init__(self, in_features: int, out_features: int, config):
        super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=False,
                         input_is_parallel=True, skip_bias_add=False)
        _mark(self.weight, 1, 1)

    def forward(self, x):
        return super().forward(x)[0]


class VocabEmbedding(VocabParallelEmbedding):
    def __init__(self, num: int, dim: int, config):
        super().__init__(num, dim, init_method=_no_init, config=config)
        _mark(self.weight, 0, 1)


class LayerFactory:
    """``GPT(args, linear=f.linear, embedding=f.embedding)``: plain layers at TP = 1."""

    def __init__(self, tp: int = 1):
        self.tp = tp
        self.config = megatron_config(tp) if tp > 1 else None

    def linear(self, in_features: int, out_features: int, kind: str = "") -> nn.Module:
        if self.tp == 1:
            return plain_linear(in_features, out_features, kind)
        if kind == "row":
            return RowLinear(in_features, out_features, self.config)
        if kind in ("column", "qkv", "head"):
            if out_features % self.tp:
                raise ValueError(f"{kind} layer with {out_features} outputs does not split over tp={self.tp}")
            return ColumnLinear(in_features, out_features, self.config, stride=3 if kind == "qkv" else 1,
                                vocab=kind == "head")
        raise ValueError(f"unknown linear kind {kind!r}: expected column, qkv, row or head")

    def embedding(self, num: int, dim: int) -> nn.Module:
        if self.tp > 1 and num % self.tp == 0:
            return VocabEmbedding(num, dim, self.config)
        if self.tp > 1:
            log.info("embedding table of %d rows does not split over tp=%d: replicated", num, self.tp)
        return nn.Embedding(num, dim)


# ---- full <-> shard ------------------------------------------------------------
def partition_of(param: torch.Tensor) -> tuple[int | None, int]:
    """(sharded dimension or None if replicated, stride) of a model parameter."""
    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim, getattr(param, "partition_stride", 1)
    return None, 1


def gather_full(local: torch.Tensor, param: torch.Tensor, group) -> torch.Tensor:
    """All-gather a TP-local tensor (a weight, or optimizer state shaped like it) into the full one."""
    dim, stride = partition_of(param)
    world = dist.get_world_size(group) if group is not None else 1
    if dim is None or world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return unshard(parts, dim, stride)


def shard_of_initial(gpt: GPT, rank: int, tp: int):
    """``GPT.materialize``'s value for a GPT built on meta: this rank's shard of the seeded whole value
    (one whole parameter at a time, never the whole model)."""
    def value(name: str, p: torch.Tensor) -> torch.Tensor:
        dim, stride = partition_of(p)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= tp
        return shard(gpt.initial_value(name, shape), dim, stride, rank, tp)
    return value


def materialize_shards(modules, device: torch.device, rank: int, tp: int, after_unit=None) -> None:
    """Allocate every GPT of ``modules`` still on the meta device with this rank's shards of its seeded
    initial weights, one unit at a time (``after_unit``: see models.build.materialize)."""
    materialize(modules, device, value_for=lambda gpt: shard_of_initial(gpt, rank, tp), after_unit=after_unit)


def to_tensor_parallel(gpt: GPT, factory: LayerFactory, rank: int) -> GPT:
    """A TP GPT holding this rank's shards of ``gpt``'s weights (same names, same flags); built on the
    meta device and left there when ``gpt`` is (``materialize`` allocates it later)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        tp_gpt = GPT(gpt.args, linear=factory.linear, embedding=factory.embedding, init_seed=gpt.init_seed)
    full = dict(gpt.named_parameters())
    for name, p in tp_gpt.named_parameters():
        p.requires_grad_(full[name].requires_grad)
    if not gpt.is_meta():
        device = next(gpt.parameters()).device
        tp_gpt.materialize(device, value=lambda name, p: shard(full[name].detach(), *partition_of(p), rank, factory.tp))
    for key, value in vars(gpt).items():  # plain attributes, e.g. an activation-checkpointing switch
        if not key.startswith("_") and key not in vars(tp_gpt):
            setattr(tp_gpt, key, value)
    tp_gpt.activation_checkpointing = getattr(gpt, "activation_checkpointing", False)
    return tp_gpt.train(gpt.training)


def tensor_parallelize(module: nn.Module, factory: LayerFactory, rank: int) -> nn.Module:
    """Replace every GPT inside ``module`` (student, teacher copy) by its tensor-parallel version."""
    if factory.tp == 1:
        return module
    if isinstance(module, GPT):
        return to_tensor_parallel(module, factory, rank)
    targets = [(parent, name, child) for parent in module.modules()
               for name, child in parent.named_children() if isinstance(child, GPT)]
    for parent, name, child in targets:
        setattr(parent, name, to_tensor_parallel(child, factory, rank))
        # The caller may still hold the full model (the trainer keeps it for FLOP counts):
        # release its weights, a full replica per rank is what TP exists to avoid.
        for p in child.parameters():
            if not p.is_meta:
                p.data = torch.empty(0, dtype=p.dtype)
    return module
