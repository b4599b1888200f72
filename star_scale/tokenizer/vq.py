"""LlamaGen's VQ tokenizer (VQ-16: downsample 16, codebook 16384, code dim 8, l2-normalised codes).

The module tree and parameter names follow LlamaGen's
``tokenizer/tokenizer_image/vq_model.py`` (the taming-transformers /
MaskGIT encoder-decoder) so that the official ``vq_ds16_c2i.pt`` loads with a
strict key check:

    encoder.conv_in, encoder.conv_blocks.<level>.{res.<i>, attn.<i>, downsample.conv},
    encoder.mid.{0,1,2}, encoder.norm_out, encoder.conv_out,
    decoder.conv_in, decoder.mid.{0,1,2}, decoder.conv_blocks.<j>.{res.<i>, attn.<i>, upsample.conv},
    decoder.norm_out, decoder.conv_out, quant_conv, post_quant_conv,
    quantize.embedding, quantize.codebook_used

(ResnetBlock: norm1, conv1, norm2, conv2, nin_shortcut; AttnBlock: norm, q, k,
v, proj_out.)  The decoder's ``conv_blocks[j]`` is level ``L-1-j`` (deepest
first); attention sits at the deepest level only.  Images are scaled to
[-1, 1]; codes are the nearest l2-normalised codebook entries of the
l2-normalised ``quant_conv`` output.  The hyper-parameters are read back from
the checkpoint's tensor shapes, so VQ-8 (ds8) checkpoints load as well.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from star_scale import atomic
from star_scale.tokenizer.base import FORMAT_KEY, Tokenizer, TokenizerError, tensors_hash
from star_scale.trust import RefusedFile
from star_scale.trust.load import load_torch

OPTIONAL_KEYS = ("quantize.codebook_used",)  # usage statistics: present when trained with show_usage


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    ch: int = 128
    encoder_ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    num_res_blocks: int = 2

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (b, hw, c)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in taming


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, ``attn`` blocks (deepest level only), then a resampler."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run(self, h):
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, ch = list(cfg.encoder_ch_mult), cfg.ch
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = ch
        for level, m in enumerate(mult):
            blk = _Level()
            for _ in range(cfg.num_res_blocks):
                blk.res.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if level == len(mult) - 1:
                    blk.attn.append(AttnBlock(cin))
            if level != len(mult) - 1:
                blk.downsample = Downsample(cin)
            self.conv_blocks.append(blk)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)])
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for blk in self.conv_blocks:
            h = blk.run(h)
            if hasattr(blk, "downsample"):
                h = blk.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, ch = list(cfg.decoder_ch_mult), cfg.ch
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            blk = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                blk.res.append(ResnetBlock(cin, ch * mult[level]))
                cin = ch * mult[level]
                if level == len(mult) - 1:
                    blk.attn.append(AttnBlock(cin))
            if level != 0:
                blk.upsample = Upsample(cin)
            self.conv_blocks.append(blk)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for blk in self.conv_blocks:
            h = blk.run(h)
            if hasattr(blk, "upsample"):
                h = blk.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_e: int, e_dim: int, l2_norm: bool = True):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> nearest codebook index (B, h*w), row-major."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        emb = self.codebook()
        d = (flat * flat).sum(1, keepdim=True) + (emb * emb).sum(1)[None] - 2.0 * flat @ emb.T
        return d.argmin(1).reshape(z.shape[0], -1)

    def lookup(self, idx: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.codebook()[idx].reshape(idx.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize.indices(self.quant_conv(self.encoder(x)))

    def decode_indices(self, idx: torch.Tensor, grid: int) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.quantize.lookup(idx, grid, grid)))


# ---- checkpoints -----------------------------------------------------------
def _torch_load(path: Path, trust_pickle: bool = False):
    # LlamaGen's training scripts pickle their argparse.Namespace next to the weights: the one class allowed.
    try:
        return load_torch(path, allowed=[argparse.Namespace], trust_pickle=trust_pickle)
    except RefusedFile as e:
        raise TokenizerError(str(e)) from None


def extract_state_dict(obj, path: str) -> dict:
    """The model state dict inside a LlamaGen checkpoint ({'model': sd}, {'ema': sd}, {'state_dict': sd} or sd)."""
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    sd = None
    for key in ("model", "ema", "state_dict", "module"):
        if isinstance(obj.get(key), dict) and any(isinstance(v, torch.Tensor) for v in obj[key].values()):
            sd = obj[key]
            break
    if sd is None:
        sd = obj
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod.", "vq_model.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if not sd:
        raise TokenizerError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:10]})")
    return sd


def infer_config(sd: dict, path: str) -> VQConfig:
    need = ["quantize.embedding.weight", "encoder.conv_in.weight", "encoder.conv_out.weight",
            "encoder.conv_blocks.0.res.0.conv1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise TokenizerError(f"{path}: not a LlamaGen VQ checkpoint: missing {missing} "
                             f"(found e.g. {sorted(sd)[:5]}); expected vq_ds16_c2i.pt or a file saved by star-scale")
    n_e, e_dim = sd["quantize.embedding.weight"].shape
    ch = sd["encoder.conv_in.weight"].shape[0]
    z = sd["encoder.conv_out.weight"].shape[0]
    enc, dec = [], []
    while f"encoder.conv_blocks.{len(enc)}.res.0.conv1.weight" in sd:
        enc.append(sd[f"encoder.conv_blocks.{len(enc)}.res.0.conv1.weight"].shape[0] // ch)
    while f"decoder.conv_blocks.{len(dec)}.res.0.conv1.weight" in sd:
        dec.append(sd[f"decoder.conv_blocks.{len(dec)}.res.0.conv1.weight"].shape[0] // ch)
    nrb = 0
    while f"encoder.conv_blocks.0.res.{nrb}.conv1.weight" in sd:
        nrb += 1
    return VQConfig(codebook_size=int(n_e), codebook_embed_dim=int(e_dim), ch=int(ch), encoder_ch_mult=enc,
                    decoder_ch_mult=list(reversed(dec)) or list(enc), z_channels=int(z), num_res_blocks=nrb)


def check_and_load(model: VQModel, sd: dict, path: str) -> None:
    """Strict load with every key accounted for; errors name the file and the keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and k not in OPTIONAL_KEYS]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"{path}: checkpoint does not match the VQ architecture {asdict(model.config)}"]
        if missing:
            lines.append(f"  missing {len(missing)} keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatches: {shapes[:4]}")
        raise TokenizerError("\n".join(lines))
    full = dict(sd)
    for k in OPTIONAL_KEYS:
        full.setdefault(k, expected[k])
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in full.items()}, strict=True)


class VQTokenizer(Tokenizer):
    kind = "vq"

    def __init__(self, model: VQModel, image_size: int = 256, *, name: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64):
        cfg = model.config
        if image_size % cfg.downsample:
            raise ValueError(f"image size {image_size} is not a multiple of the VQ downsampling factor {cfg.downsample}")
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.image_size, self.grid_size = int(image_size), int(image_size) // cfg.downsample
        self.codebook_size = cfg.codebook_size
        self.batch_size = batch_size
        self.name = name or f"llamagen-vq-ds{cfg.downsample}-c{cfg.codebook_size}-d{cfg.codebook_embed_dim}"
        sd = {k: v for k, v in self.model.state_dict().items() if k not in OPTIONAL_KEYS}
        self.weights_hash = tensors_hash(sd, {"kind": self.kind, "config": asdict(cfg)})

    def encode(self, images) -> torch.Tensor:
        x = self._images(images)
        out = []
        with torch.inference_mode():
            for s in range(0, x.shape[0], self.batch_size):
                xb = x[s: s + self.batch_size].to(self.device).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
                out.append(self.model.encode_indices(xb).to("cpu", torch.int64))
        return torch.cat(out) if out else torch.empty((0, self.tokens_per_image), dtype=torch.int64)

    def decode(self, codes) -> torch.Tensor:
        c = self._codes(codes)
        out = []
        with torch.inference_mode():
            for s in range(0, c.shape[0], self.batch_size):
                img = self.model.decode_indices(c[s: s + self.batch_size].to(self.device), self.grid_size)
                out.append(((img.clamp(-1, 1) + 1.0) * 127.5).round().to("cpu", torch.uint8).permute(0, 2, 3, 1))
        return torch.cat(out).contiguous() if out else torch.empty((0, self.image_size, self.image_size, 3), dtype=torch.uint8)

    def save(self, path: str | os.PathLike) -> None:
        """LlamaGen-compatible file ({'model': state_dict}) plus star-scale metadata."""
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        atomic.torch_save({"model": sd, FORMAT_KEY: {"kind": self.kind, "image_size": self.image_size, "name": self.name,
                                                     "config": asdict(self.model.config), "weights_hash": self.weights_hash}},
                          path)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, image_size: int | None = None, device="cpu", obj=None) -> "VQTokenizer":
        path = Path(path)
        obj = _torch_load(path) if obj is None else obj
        sd = extract_state_dict(obj, str(path))
        meta = obj.get(FORMAT_KEY, {}) if isinstance(obj, dict) else {}
        cfg = VQConfig(**meta["config"]) if "config" in meta else infer_config(sd, str(path))
        model = VQModel(cfg)
        check_and_load(model, sd, str(path))
        tok = cls(model, image_size=int(image_size or meta.get("image_size", 256)), name=meta.get("name"), device=device)
        if meta.get("weights_hash") not in (None, tok.weights_hash):
            raise TokenizerError(f"{path}: stored weights hash {meta['weights_hash'][:12]} does not match the weights "
                                 f"({tok.weights_hash[:12]}): the file is corrupt")
        return tok


def vq_ds16(**overrides) -> VQModel:
    """A randomly initialised VQ-16 (overrides shrink it for tests, e.g. ch=32, codebook_size=64)."""
    return VQModel(VQConfig(**overrides))
