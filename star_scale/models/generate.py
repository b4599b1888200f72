"""Class-conditional sampling: KV cache, classifier-free guidance, temperature, top-k, top-p."""
from __future__ import annotations

from typing import Optional

import torch

from star_scale.models.gpt import GPT


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; -inf elsewhere."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(B, V) probabilities, (B,) uniforms in [0, 1) -> (B,) ids: the first id whose cumulative mass exceeds u.

    Each row depends only on its own probabilities and uniform, so a sample's
    tokens do not depend on which other samples share its batch.
    """
    cdf = probs.float().cumsum(-1)
    target = uniform.to(cdf)[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Rounding can put the target at the total mass: fall back to the last id with non-zero mass.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).float().argmax(-1)
    return torch.minimum(idx, last)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator], uniform: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids; temperature 0 is greedy.

    uniform: optional (B,) numbers in [0, 1), one per row; when given, rows are
    sampled by inverse CDF from them instead of ``torch.multinomial(generator)``.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    if uniform is not None:
        return inverse_cdf_sample(probs, uniform)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def guided(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG over a [conditional; unconditional] batch: u + (c - u) * scale."""
    cond, uncond = logits.chunk(2)
    return uncond + (cond - uncond) * scale


@torch.no_grad()
def generate(model: GPT, labels: torch.Tensor, *, cfg_scale: float = 1.0, cfg_interval: float = 1.0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample T image tokens per label: (B,) -> (B, T).

    cfg_interval: fraction of the steps (from the first) that use guidance;
    the rest sample from the conditional logits alone.
    noise: optional (B, T) uniforms in [0, 1): step i of sample b draws its token
    by inverse CDF from noise[b, i] (``generator`` is then unused).  Per-sample
    noise makes a sample's tokens independent of the random state of the others.
    """
    was_training = model.training
    model.eval()
    a = model.args
    n_tokens = a.grid_size**2
    if noise is not None and tuple(noise.shape) != (labels.shape[0], n_tokens):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected (batch, tokens) = {(labels.shape[0], n_tokens)}")
    use_cfg = cfg_scale != 1.0
    cond = torch.cat([labels, torch.full_like(labels, a.num_classes)]) if use_cfg else labels
    cache = model.new_cache(cond.shape[0]) if use_cache else None
    tokens = torch.empty(cond.shape[0], 0, dtype=torch.long, device=labels.device)
    for i in range(n_tokens):
        if cache is None:
            logits = model(tokens, cond).logits[:, -1]
        elif i == 0:
            logits = model(None, cond, cache=cache).logits[:, -1]
        else:
            logits = model(tokens[:, -1:], None, cache=cache).logits[:, -1]
        if use_cfg:
            logits = guided(logits, cfg_scale) if i < cfg_interval * n_tokens else logits.chunk(2)[0]
        nxt = sample_next(logits, temperature, top_k, top_p, generator, None if noise is None else noise[:, i])
        if use_cfg:
            nxt = nxt.repeat(2)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    model.train(was_training)
    return tokens[: labels.shape[0]]
