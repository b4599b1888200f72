"""Attention kernels, chosen by what each can do on the device at hand, not only by what is installed.

- Unmasked causal (AR, the teacher, the unmasked student): flash-attn when
  installed *and* the inputs are fp16/bf16 on compute capability >= 8.0;
  otherwise torch SDPA with ``is_causal`` (no mask tensor, so SDPA's own flash
  kernel stays eligible).
- Key-masked (the MIM student: causal AND visible key AND diagonal): a dense
  bool mask for SDPA (its memory-efficient or math kernel; flash takes no
  mask) or FlexAttention with a block mask.  Which one is picked per (device,
  head size, dtype) by timing forward + backward once at the training shape
  (``choose_masked``; the engine passes the shape in and, distributed, takes
  rank 0's choice on every rank), logged; CPU uses SDPA (FlexAttention has no
  CPU backward in torch 2.13).  Outside an engine (bench, direct use) the
  first masked forward times a stand-in shape (``pick_masked``).
  ``STAR_SCALE_MASKED_ATTENTION=sdpa|sdpa-efficient|sdpa-math|flex`` forces one.
- Incremental decoding: one new query sees every cached key, so no mask at all.
- Head sizes SDPA's fused kernels reject (not a multiple of 8, e.g. the 3B
  preset's 100) are zero-padded to the next multiple of 8 on CUDA, scale kept
  at 1/sqrt(true size): otherwise SDPA silently falls to the math kernel.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MASKED_BACKENDS = ("sdpa-efficient", "sdpa-math", "flex")  # candidates on CUDA; "sdpa" = SDPA's own choice
_SDPA_KERNEL = {"sdpa-efficient": "efficient", "sdpa-math": "math"}
_LOGGED: set = set()


def log_once(key, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(msg, *args)


@functools.lru_cache(maxsize=None)
def flash_attn_func():
    """flash-attn's ``flash_attn_func``, imported once; None (reason logged once) when missing or mis-built."""
    try:
        from flash_attn import flash_attn_func as fn  # optional GPU extra
        return fn
    except Exception as e:  # ImportError, or an undefined CUDA symbol of a mis-built wheel
        log.info("flash-attn unavailable (%s: %s); using torch SDPA", type(e).__name__, e)
        return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def flash_attn_eligible(q: torch.Tensor) -> bool:
    """flash-attn 2 runs fp16/bf16 on Ampere or newer (compute capability >= 8.0), head size <= 256."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
        return False
    return _capability(q.device.index or 0) >= (8, 0) and flash_attn_func() is not None


def _padded(q, k, v, pad_to: Optional[int] = None):
    """Zero-pad the head size to a multiple of ``pad_to`` (default 8 on CUDA, 1 elsewhere):
    q.k and the kept output columns are unchanged."""
    d = q.shape[-1]
    pad = -d % (pad_to or (8 if q.device.type == "cuda" else 1))
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    return q, k, v, d, pad


def sdpa(q, k, v, mask=None, is_causal=False, kernel: Optional[str] = None, pad_to: Optional[int] = None):
    """torch SDPA on (B, H, S, D), padding odd head sizes; kernel 'efficient'/'math' pins SDPA's choice."""
    q, k, v, d, pad = _padded(q, k, v, pad_to)
    if kernel is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=1 / math.sqrt(d))
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.EFFICIENT_ATTENTION if kernel == "efficient" else SDPBackend.MATH
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                 scale=1 / math.sqrt(d))
    return out[..., :d] if pad else out


@functools.lru_cache(maxsize=None)
def _flex_kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # Eager FlexAttention is a slow reference implementation; compiled it is the fused kernel.
    # Default dynamic: a second shape compiles a dynamic kernel instead of recompiling for every shape.
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


@functools.lru_cache(maxsize=16)
def _tril(s: int, device: torch.device) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool, device=device).tril()


@functools.lru_cache(maxsize=16)
def _eye(s: int, device: torch.device) -> torch.Tensor:
    return torch.eye(s, dtype=torch.bool, device=device)


def dense_key_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) visible keys -> (B, 1, S, S) bool: causal AND (visible key OR diagonal)."""
    s = key_mask.shape[1]
    return (_tril(s, key_mask.device)[None] & (key_mask[:, None, :] | _eye(s, key_mask.device)[None]))[:, None]


def flex_block_mask(key_mask: torch.Tensor):
    """The same mask as ``dense_key_mask`` as FlexAttention's BlockMask (blocks with no visible key skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = key_mask.shape

    def mask_mod(bi, h, qi, ki):
        return (ki <= qi) & (key_mask[bi, ki] | (qi == ki))

    return create_block_mask(mask_mod, b, None, s, s, device=key_mask.device)


@dataclass
class KeyMask:
    """One forward's MIM mask in the form its backend wants (built once, shared by every layer)."""

    backend: str  # "sdpa" or one of MASKED_BACKENDS
    mask: object  # dense (B, 1, S, S) bool, or a BlockMask (backend "flex")

    @classmethod
    def build(cls, key_mask: torch.Tensor, head_dim: int, dtype: torch.dtype) -> "KeyMask":
        backend = pick_masked(key_mask.device, head_dim, dtype)
        return cls(backend, flex_block_mask(key_mask) if backend == "flex" else dense_key_mask(key_mask))

    def attend(self, q, k, v):
        if self.backend == "flex":
            q, k, v, d, pad = _padded(q, k, v)
            out = _flex_kernel(q.device.type)(q, k, v, block_mask=self.mask, scale=1 / math.sqrt(d))
            return out[..., :d] if pad else out
        return sdpa(q, k, v, self.mask, kernel=_SDPA_KERNEL.get(self.backend))


def causal(q, k, v):
    """Unmasked causal attention on (B, H, S, D)."""
    if flash_attn_eligible(q):
        log_once(("flash-attn", q.device), "attention backend (causal): flash-attn")
        out = flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    log_once(("sdpa", q.device), "attention backend (causal): torch SDPA is_causal on %s", q.device.type)
    return sdpa(q, k, v, is_causal=True)


def incremental(q, k, v):
    """New queries at the end of the cached keys: causal w.r.t. that offset (no mask for one query)."""
    s, total = q.shape[2], k.shape[2]
    if s == 1:
        return sdpa(q, k, v)
    if s == total:
        return causal(q, k, v)
    return sdpa(q, k, v, torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s))


# ---- which masked backend ---------------------------------------------------------------------------
_PICKS: dict = {}


def time_masked(backend: str, batch: int, heads: int, seq: int, head_dim: int, dtype, device,
                reps: int = 5, ratio: float = 0.25) -> tuple[float, float]:
    """(seconds per forward + backward, max |out - fp32 math reference|) of one masked backend.

    Runs outside any autocast region (the trainer may call it mid-forward): the reference stays fp32.
    """
    with torch.autocast(device.type, enabled=False):
        return _time_masked(backend, batch, heads, seq, head_dim, dtype, device, reps, ratio)


def _time_masked(backend, batch, heads, seq, head_dim, dtype, device, reps, ratio):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    key_mask = torch.rand(batch, seq, device=device, generator=g) >= ratio
    key_mask[:, 0] = True
    ref = sdpa(*(t.float() for t in (q, k, v)), dense_key_mask(key_mask), kernel="math")
    mask = KeyMask(backend, flex_block_mask(key_mask) if backend == "flex" else dense_key_mask(key_mask))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if device.type == "cpu":  # FlexAttention has no CPU backward: time every backend forward only there
        q, k, v = (t.detach() for t in (q, k, v))
    err, elapsed = 0.0, []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        out = mask.attend(q, k, v)
        if out.requires_grad:
            out.float().square().sum().backward()
        _sync(device)
        elapsed.append(time.perf_counter() - t0)
        err = (out.detach().float() - ref).abs().max().item()
    return sorted(elapsed[2:])[reps // 2], err


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class MaskedShape:
    """The key-masked attention of one training micro-batch: (sequences, local heads, length, head size)."""

    batch: int
    heads: int
    seq: int
    head_dim: int


STAND_IN = (8, 4, 257)  # (batch, heads, length) timed when no engine passed the training shape


def _forced() -> Optional[str]:
    forced = os.environ.get("STAR_SCALE_MASKED_ATTENTION", "auto")
    if forced == "auto":
        return None
    if forced not in MASKED_BACKENDS + ("sdpa",):
        raise ValueError(f"STAR_SCALE_MASKED_ATTENTION={forced!r}: expected auto, sdpa or one of {MASKED_BACKENDS}")
    return forced


def _key(device: torch.device, head_dim: int, dtype) -> tuple:
    index = device.index
    if device.type == "cuda" and index is None:  # "cuda" and "cuda:N" of the current device are one pick
        index = torch.cuda.current_device()
    return device.type, index, head_dim, dtype


def pick_masked(device: torch.device, head_dim: int, dtype: torch.dtype) -> str:
    """The masked backend for (device, head size, dtype): forced, else the one the engine chose (``use_masked``),
    else chosen now at a stand-in shape."""
    forced = _forced()
    if forced:
        return forced
    key = _key(device, head_dim, dtype)
    if key not in _PICKS:
        use_masked(device, head_dim, dtype, choose_masked(device, MaskedShape(*STAND_IN, head_dim), dtype))
    return _PICKS[key]


def use_masked(device: torch.device, head_dim: int, dtype: torch.dtype, backend: str) -> None:
    """Every later masked forward on (device, head size, dtype) runs ``backend``."""
    _PICKS[_key(device, head_dim, dtype)] = backend
    log.info("attention backend (MIM key-masked, head size %d, %s, %s): %s", head_dim,
             str(dtype).replace("torch.", ""), device.type, backend)


def choose_masked(device: torch.device, shape: MaskedShape, dtype: torch.dtype, timer=None) -> str:
    """Forced, SDPA on CPU, else the fastest backend measured at ``shape`` (see ``measure_masked``)."""
    forced = _forced()
    if forced:
        return forced
    return measure_masked(device, shape, dtype, timer) if device.type == "cuda" else "sdpa"


def _time_shape(backend: str, shape: MaskedShape, dtype, device) -> float:
    return time_masked(backend, shape.batch, shape.heads, shape.seq, shape.head_dim, dtype, device, reps=3)[0]


def measure_masked(device: torch.device, shape: MaskedShape, dtype, timer=None) -> str:
    """The fastest of MASKED_BACKENDS at ``shape``; ``timer(backend, shape, dtype, device) -> seconds``
    (default: forward + backward, private generator inside: the training RNG does not move)."""
    timer = timer or _time_shape
    times = {}
    for backend in MASKED_BACKENDS:
        try:
            times[backend] = timer(backend, shape, dtype, device)
        except Exception as e:  # a kernel that rejects this shape or dtype is simply not a candidate
            log.info("masked attention %s unavailable for head size %d: %s", backend, shape.head_dim, e)
    log.info("masked attention timings at %s (ms): %s", (shape.batch, shape.heads, shape.seq, shape.head_dim),
             {k: round(1e3 * v, 3) for k, v in times.items()})
    return min(times, key=times.get) if times else "sdpa-math"
