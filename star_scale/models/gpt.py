"""LlamaGen's class-conditional GPT, as plain single-device PyTorch.

Sequence layout: position 0 holds the class embedding, positions 1..T hold
image tokens 0..T-1; the logits at position p predict image token p.  Blocks
are Llama-style (RMSNorm, SwiGLU, 2D rotary embeddings over the token grid).
Parameter names follow LlamaGen's so its checkpoints load without renaming.

ST-AR additions: ``forward`` takes an optional per-sequence key mask (the MIM
student attends only to unmasked keys) and returns the hidden states of any
requested layers.  Parallelism is applied from outside: ``layer_factory`` can
swap ``nn.Linear``/``nn.Embedding`` for tensor-parallel versions.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from star_scale.models import attention
from star_scale.models.head_loss import chunked_cross_entropy


@dataclass
class GPTArgs:
    layers: int = 12
    heads: int = 12
    width: int = 768
    vocab_size: int = 16384
    num_classes: int = 1000
    grid_size: int = 16  # image tokens per side: T = grid_size ** 2
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    init_std: float = 0.02
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def ffn_hidden(self) -> int:
        # SwiGLU keeps the 4x FFN's parameter count: 2/3 * 4 * width, rounded up.
        hidden = int(2 * 4 * self.width / 3)
        return -(-hidden // self.ffn_multiple_of) * self.ffn_multiple_of

    @property
    def seq_len(self) -> int:
        return 1 + self.grid_size**2


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 even under bf16 autocast
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_table_2d(grid_size: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(1 + grid^2, head_dim // 2, 2) table of (cos, sin) per rotary pair.

    The first head_dim/4 pairs rotate with the token's row, the last head_dim/4
    with its column; frequencies are base^(-2i / (head_dim/2)).  Row 0 (the
    class position) is all zeros, as in LlamaGen: that zeroes the class
    token's queries and keys, and checkpoint compatibility depends on it.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid_size).float(), inv_freq)  # (grid, head_dim/4)
    rows = angles[:, None, :].expand(grid_size, grid_size, -1)
    cols = angles[None, :, :].expand(grid_size, grid_size, -1)
    grid = torch.cat([rows, cols], dim=-1).flatten(0, 1)  # (grid^2, head_dim/2)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1)
    return torch.cat([torch.zeros(1, half, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D) with adjacent (even, odd) channels as one rotary pair; table: (S, D/2, 2)."""
    if torch.compiler.is_compiling():  # inductor fuses the real form; it has no complex kernels
        return rope_real(x.float(), table).type_as(x)
    return rope_complex(x.float(), table).type_as(x)


def rope_real(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    xp = x.unflatten(-1, (-1, 2))
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    return torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], dim=-1).flatten(-2)


def rope_complex(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """rope_real as one complex multiply: a single vectorised kernel each way, 3-4x faster in eager
    mode than the real form on strided halves, with the same products and sums (bit-identical)."""
    if x.stride(-1) != 1 or any(st % 2 for st in x.stride()[:-1]):
        x = x.contiguous()  # view_as_complex needs (re, im) adjacent and pair-aligned strides
    rotated = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.view_as_complex(table)[None, :, None]
    return torch.view_as_real(rotated).flatten(-2)


class KVCache:
    """Per-layer key/value buffers for incremental decoding."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0  # positions filled so far


class Attention(nn.Module):
    def __init__(self, args: GPTArgs, linear: Callable[..., nn.Module]):
        super().__init__()
        self.heads, self.head_dim = args.heads, args.head_dim
        # Fused q|k|v projection, named as in LlamaGen.  Kind "qkv": column-parallel under TP,
        # but each rank takes its own heads' q, k and v; heads per rank follow from its rows.
        self.wqkv = linear(args.width, 3 * args.width, kind="qkv")
        self.wo = linear(args.width, args.width, kind="row")
        self.resid_dropout = nn.Dropout(args.resid_dropout)

    def forward(self, x, rope, attn_mask=None, cache: Optional[KVCache] = None, layer: int = 0):
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).unflatten(-1, (3, -1, self.head_dim)).unbind(2)  # (B, S, H, D) each
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        if cache is not None:
            start = cache.length
            cache.k[layer][:b, :, start : start + s] = k
            cache.v[layer][:b, :, start : start + s] = v
            k, v = cache.k[layer][:b, :, : start + s], cache.v[layer][:b, :, : start + s]
        out = self._attend(q, k, v, attn_mask, incremental=cache is not None)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.resid_dropout(self.wo(out))

    def _attend(self, q, k, v, attn_mask: Optional[attention.KeyMask], incremental: bool):
        if incremental:
            return attention.incremental(q, k, v)
        if attn_mask is not None:
            return attn_mask.attend(q, k, v)
        return attention.causal(q, k, v)


class FeedForward(nn.Module):
    def __init__(self, args: GPTArgs, linear: Callable[..., nn.Module]):
        super().__init__()
        self.w1 = linear(args.width, args.ffn_hidden, kind="column")
        self.w3 = linear(args.width, args.ffn_hidden, kind="column")
        self.w2 = linear(args.ffn_hidden, args.width, kind="row")
        self.ffn_dropout = nn.Dropout(args.ffn_dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, args: GPTArgs, linear):
        super().__init__()
        self.attention = Attention(args, linear)
        self.feed_forward = FeedForward(args, linear)
        self.attention_norm = RMSNorm(args.width, args.norm_eps)
        self.ffn_norm = RMSNorm(args.width, args.norm_eps)

    def forward(self, x, rope, attn_mask=None, cache=None, layer=0):
        h = x + self.attention(self.attention_norm(x), rope, attn_mask, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding with a learned null class (index ``num_classes``) for CFG."""

    def __init__(self, num_classes: int, width: int, dropout: float, embedding):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = embedding(num_classes + 1, width)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


def plain_linear(in_features: int, out_features: int, kind: str = "") -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


@dataclass
class GPTOutput:
    logits: Optional[torch.Tensor]  # (B, S, V) float32
    hidden: dict  # layer index (1..L) -> (B, S, width) block output


def initial_value(seed: int, name: str, shape: Sequence[int], std: float) -> torch.Tensor:
    """Parameter ``name``'s initial value (fp32, CPU), from a generator of its own seeded by (seed, name):
    any one weight can be made alone, in any order, on any rank, and equals the others' copy of it."""
    # device="cpu" throughout: under `with torch.device(cuda)` a bare factory call lands on CUDA, where a
    # CPU generator is refused.
    if name == "output.weight":
        return torch.zeros(shape, device="cpu")  # zero-init head: uniform first predictions
    if len(shape) == 1:
        return torch.ones(shape, device="cpu")  # RMSNorm gains
    key = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.empty(shape, device="cpu").normal_(std=std, generator=generator)


def _shapes(gpt: nn.Module) -> list:
    return [(name, tuple(p.shape)) for name, p in gpt.named_parameters()]


def _allocate(unit: nn.Module, device) -> nn.Module:
    """Replace the unit's meta parameters by empty ones on ``device`` (attributes kept)."""
    for module in unit.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)  # e.g. megatron's tensor-parallel marks
                module._parameters[key] = new
    return unit


class GPT(nn.Module):
    """init_seed: the seed of every initial weight (``initial_value``); by default one draw from torch's
    global generator, the only draw construction makes, so a GPT built on the meta device and materialised
    later leaves the global stream exactly where a GPT built in place does."""

    def __init__(self, args: GPTArgs, linear=plain_linear, embedding=nn.Embedding, init_seed: Optional[int] = None):
        super().__init__()
        if args.width % args.heads or args.head_dim % 4:
            raise ValueError(f"width {args.width} must split into {args.heads} heads of a multiple-of-4 size")
        self.args = args
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu")) if init_seed is None else int(init_seed)
        with torch.random.fork_rng(devices=[]):  # the layers' own default inits are overwritten below
            self.cls_embedding = LabelEmbedder(args.num_classes, args.width, args.class_dropout, embedding)
            self.tok_embeddings = embedding(args.vocab_size, args.width)
            self.tok_dropout = nn.Dropout(args.token_dropout)
            self.layers = nn.ModuleList(Block(args, linear) for _ in range(args.layers))
            self.norm = RMSNorm(args.width, args.norm_eps)
            self.output = linear(args.width, args.vocab_size, kind="head")
        self.register_buffer("rope", rope_table_2d(args.grid_size, args.head_dim, args.rope_base), persistent=False)
        self.activation_checkpointing = False  # set by the engine from parallel.activation_checkpointing
        self.reset_parameters()

    def initial_value(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """The whole (unsharded) initial value of parameter ``name`` of shape ``shape``."""
        return initial_value(self.init_seed, name, shape, self.args.init_std)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every allocated weight from ``initial_value`` (a GPT built on the meta device stays
        unallocated until ``materialize``)."""
        for name, p in self.named_parameters():
            if not p.is_meta:
                p.copy_(self.initial_value(name, p.shape))

    def units(self) -> list[tuple[str, nn.Module]]:
        """(name prefix, module) of the pieces ``materialize`` allocates one at a time: the class and
        token embeddings, each block, the final norm, the head."""
        out = []
        for name, child in self.named_children():
            out += [(f"{name}.{i}", b) for i, b in enumerate(child)] if name == "layers" else [(name, child)]
        return [(name, m) for name, m in out if next(m.parameters(), None) is not None]

    @torch.no_grad()
    def materialize(self, device: torch.device | str = "cpu", value: Optional[Callable] = None,
                    after_unit: Optional[Callable[[nn.Module], None]] = None,
                    twins: Sequence[tuple["GPT", Optional[Callable]]] = ()) -> "GPT":
        """Allocate a GPT built under ``torch.device("meta")`` on ``device``, one unit at a time, and fill
        every parameter with ``value(name, param)`` (default: its initial value).  ``after_unit(unit)``
        runs once a unit is filled, before the next is allocated: a sharding engine partitions it there,
        so the whole model never exists at once.  Python attributes of the parameters are kept.

        ``twins``: (gpt, its after_unit) for copies of this GPT still on meta (an EMA teacher: same seed,
        args and parameters), allocated in the same pass and filled from the same ``value`` call, so
        each weight is drawn once for all of them."""
        value = value or (lambda name, p: self.initial_value(name, p.shape))
        group = [(self, after_unit), *twins]
        for gpt, _ in twins:
            if (gpt.init_seed, gpt.args) != (self.init_seed, self.args) or _shapes(gpt) != _shapes(self):
                raise ValueError("materialize twins must be copies of the GPT: same init_seed, args and parameters")
        for gpt, _ in group:
            with torch.device("cpu"):  # computed on the CPU as before, whatever the ambient device
                gpt.rope = rope_table_2d(self.args.grid_size, self.args.head_dim, self.args.rope_base).to(device)
        for units in zip(*(gpt.units() for gpt, _ in group)):
            params = [dict(_allocate(unit, device).named_parameters()) for _, unit in units]
            prefix = units[0][0]
            for local, p in params[0].items():
                filled = value(f"{prefix}.{local}", p)
                for each in params:
                    each[local].copy_(filled)
            for (_, after), (_, unit) in zip(group, units):
                if after is not None:
                    after(unit)
        return self

    def is_meta(self) -> bool:
        return any(p.is_meta for p in self.parameters())

    def forward(
        self,
        tokens: torch.Tensor,
        labels: Optional[torch.Tensor],
        *,
        key_mask: Optional[torch.Tensor] = None,
        return_layers: Sequence[int] = (),
        logits: bool = True,
        cache: Optional[KVCache] = None,
    ) -> GPTOutput:
        """Run the sequence [class, tokens...].

        tokens: (B, n) image tokens (n <= T; training passes the first T-1).
        labels: (B,) class ids, or None to continue a cached sequence.
        key_mask: (B, S) bool, True = key visible; combined with the causal mask (the
            diagonal stays visible: a query always attends to its own position).
        return_layers: block indices (1..layers) whose outputs to return.
        cache: a KVCache to read and extend (incremental decoding).
        """
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(labels))
        if tokens is not None and tokens.shape[1] > 0:
            parts.append(self.tok_embeddings(tokens))
        h = self.tok_dropout(torch.cat(parts, dim=1))
        start = cache.length if cache is not None else 0
        rope = self.rope[start : start + h.shape[1]]
        attn_mask = None
        if key_mask is not None:
            # Causal, minus the masked key columns, but a query always sees its own
            # position (so no softmax row is empty); one mask for all layers and heads.
            dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
            attn_mask = attention.KeyMask.build(key_mask, self.args.head_dim, dtype)
        hidden = {}
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if recompute:  # keep only block inputs; recompute the block in backward (RNG state preserved)
                h = checkpoint(layer, h, rope, attn_mask, None, i, use_reentrant=False)
            else:
                h = layer(h, rope, attn_mask, cache, i)
            if i + 1 in return_layers:
                hidden[i + 1] = h
        if cache is not None:
            cache.length += h.shape[1]
        out = self.output(self.norm(h)).float() if logits else None
        return GPTOutput(out, hidden)

    def next_token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits (B, T, V) for targets (B, T).

        A tensor-parallel head brings its own loss (vocab-parallel cross-entropy
        over its vocab-sharded logits); a plain head uses F.cross_entropy.
        """
        own = getattr(self.output, "cross_entropy", None)
        if own is not None:
            return own(logits, targets)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def head_loss(self, last_hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``next_token_loss`` from the last block's output (B, T, W): a plain head never holds all fp32 logits."""
        if getattr(self.output, "cross_entropy", None) is not None:  # TP: vocab-sharded logits are small per rank
            return self.next_token_loss(self.output(self.norm(last_hidden)).float(), targets)
        return chunked_cross_entropy(self.norm, self.output, last_hidden, targets)

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> KVCache:
        a = self.args
        p = next(self.parameters())
        heads = self.layers[0].attention.wqkv.weight.shape[0] // (3 * a.head_dim)  # local heads under TP
        autocast = torch.is_autocast_enabled(p.device.type)  # bf16 sampling: a bf16 cache, half the bytes
        dtype = torch.get_autocast_dtype(p.device.type) if autocast else p.dtype
        return KVCache(a.layers, batch, heads, max_len or a.seq_len, a.head_dim, p.device, dtype)

    def compile_blocks(self) -> None:
        """torch.compile each block in place (parameter names unchanged; masks and caches stay eager inputs)."""
        for block in self.layers:
            block.compile()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, training: bool = True) -> int:
        """FLOPs per token: 2 per weight multiply plus causal attention; training = 3x forward."""
        a = self.args
        matmul_params = a.layers * (4 * a.width**2 + 3 * a.width * a.ffn_hidden) + a.width * a.vocab_size
        # QK^T and AV, 2 FLOPs per multiply-add, over S/2 keys on average (causal).
        attention = a.layers * 2 * 2 * a.width * a.seq_len // 2
        forward = 2 * matmul_params + attention
        return 3 * forward if training else forward
