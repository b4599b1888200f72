"""Tokenizers: the small k-means patch tokenizer and LlamaGen's VQ-16 architecture / checkpoint loading."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from star_scale.tokenizer import (
    PatchTokenizer,
    TokenizerError,
    VQConfig,
    VQModel,
    VQTokenizer,
    load_tokenizer,
    psnr,
    reconstruction_grid,
    vq_ds16,
)


@pytest.fixture(scope="module")
def demo_crops(tmp_path_factory):
    from PIL import Image

    from star_scale.demo.data import make_demo_images
    from tokenize_data.images import ten_crops

    root = make_demo_images(tmp_path_factory.mktemp("demo"), classes=8, per_class=16, size=36, seed=0)
    files = sorted(root.rglob("*.png"))
    return np.concatenate([ten_crops(Image.open(f).convert("RGB"), 32) for f in files])  # (1280, 32, 32, 3)


@pytest.fixture(scope="module")
def patch_tok(demo_crops):
    return PatchTokenizer.fit(demo_crops[::2], codebook_size=256, seed=0)


# ---- patch tokenizer -----------------------------------------------------------------
def test_patch_tokenizer_interface_and_roundtrip(patch_tok, demo_crops):
    tok = patch_tok
    assert (tok.image_size, tok.grid_size, tok.codebook_size, tok.tokens_per_image) == (32, 8, 256, 64)
    held_out = demo_crops[1::2][:400]
    codes = tok.encode(held_out)
    assert codes.shape == (400, 64) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 256
    rec = tok.decode(codes)
    assert rec.shape == (400, 32, 32, 3) and rec.dtype == torch.uint8
    assert psnr(held_out, rec.numpy()) > 19.0  # looks like the original (flat shapes, blocky edges)
    assert torch.equal(tok.encode(torch.from_numpy(held_out[:3])), codes[:3])  # tensor or ndarray input
    grid = reconstruction_grid(tok, held_out[:6], cols=3)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 34 + 2, 3 * 66 + 2, 3)


def test_patch_tokenizer_deterministic_save_load(patch_tok, demo_crops, tmp_path):
    again = PatchTokenizer.fit(demo_crops[::2], codebook_size=256, seed=0)
    assert again.weights_hash == patch_tok.weights_hash
    other = PatchTokenizer.fit(demo_crops[::2], codebook_size=256, seed=1)
    assert other.weights_hash != patch_tok.weights_hash
    patch_tok.save(tmp_path / "tok.pt")
    loaded = load_tokenizer(tmp_path / "tok.pt")
    assert isinstance(loaded, PatchTokenizer) and loaded.weights_hash == patch_tok.weights_hash
    assert loaded.name == patch_tok.name == "patch-kmeans-256-p4-32px"
    assert torch.equal(loaded.encode(demo_crops[:5]), patch_tok.encode(demo_crops[:5]))


def test_tokenizer_input_checks(patch_tok):
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        patch_tok.encode(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        patch_tok.encode(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        patch_tok.decode(torch.full((1, 64), 256))
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        patch_tok.decode(torch.zeros((1, 63), dtype=torch.long))


# ---- VQ-16 ------------------------------------------------------------------------------
# Official parameter names of LlamaGen's VQ-16 (tokenizer/tokenizer_image/vq_model.py), a sample of each kind.
OFFICIAL_KEYS = [
    "encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.norm1.weight", "encoder.conv_blocks.0.res.1.conv2.bias",
    "encoder.conv_blocks.0.downsample.conv.weight", "encoder.conv_blocks.2.res.0.nin_shortcut.weight",
    "encoder.conv_blocks.4.attn.1.proj_out.weight", "encoder.conv_blocks.4.attn.0.q.weight",
    "encoder.mid.0.conv1.weight", "encoder.mid.1.norm.bias", "encoder.mid.2.norm2.weight", "encoder.norm_out.weight",
    "encoder.conv_out.bias", "decoder.conv_in.weight", "decoder.mid.1.k.weight", "decoder.conv_blocks.0.attn.2.v.bias",
    "decoder.conv_blocks.0.res.2.conv1.weight", "decoder.conv_blocks.0.upsample.conv.weight",
    "decoder.conv_blocks.1.res.0.nin_shortcut.bias", "decoder.conv_blocks.4.res.2.norm2.bias", "decoder.norm_out.bias",
    "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.bias", "quantize.embedding.weight",
    "quantize.codebook_used",
]


def test_full_vq16_structure_on_meta_device():
    with torch.device("meta"):  # no memory: only names and shapes
        model = VQModel(VQConfig())
    sd = model.state_dict()
    # Counted once against LlamaGen's own module: 344 tensors, 71.9M parameters ("72M" in the paper).
    assert len(sd) == 344
    assert sum(p.numel() for p in model.parameters()) == 71_883_403
    assert all(k in sd for k in OFFICIAL_KEYS)
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in sd and "encoder.conv_blocks.4.downsample.conv.weight" not in sd
    assert tuple(sd["quantize.embedding.weight"].shape) == (16384, 8)
    assert tuple(sd["quant_conv.weight"].shape) == (8, 256, 1, 1)
    assert tuple(sd["quantize.codebook_used"].shape) == (65536,)


@pytest.fixture(scope="module")
def small_vq():
    torch.manual_seed(0)
    return vq_ds16(ch=32, codebook_size=64, z_channels=32)


def test_vq_official_layout_loads_strictly(small_vq, tmp_path):
    sd = small_vq.state_dict()
    torch.save({"model": sd, "steps": 123}, tmp_path / "vq_ds16_c2i.pt")  # the official file's layout, no metadata
    tok = load_tokenizer(tmp_path / "vq_ds16_c2i.pt", image_size=32)
    assert isinstance(tok, VQTokenizer)
    cfg = tok.model.config
    assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.ch, cfg.z_channels, cfg.num_res_blocks) == (64, 8, 32, 32, 2)
    assert list(cfg.encoder_ch_mult) == [1, 1, 2, 2, 4] and list(cfg.decoder_ch_mult) == [1, 1, 2, 2, 4]
    assert (tok.grid_size, tok.codebook_size, tok.name) == (2, 64, "llamagen-vq-ds16-c64-d8")
    for k, v in tok.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    codes = tok.encode(x)
    assert codes.shape == (3, 4) and codes.dtype == torch.int64 and int(codes.max()) < 64
    img = tok.decode(codes)
    assert img.shape == (3, 32, 32, 3) and img.dtype == torch.uint8
    # l2-normalised nearest code: the same as argmax of cosine similarity
    with torch.no_grad():
        z = small_vq.quant_conv(small_vq.encoder(x.permute(0, 3, 1, 2).float() / 127.5 - 1))
        z = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
        e = torch.nn.functional.normalize(small_vq.quantize.embedding.weight, dim=-1)
        assert torch.equal((z @ e.T).argmax(1).reshape(3, 4), codes)
    # save() keeps LlamaGen's layout and round-trips with the same hash
    tok.save(tmp_path / "mine.pt")
    raw = torch.load(tmp_path / "mine.pt", weights_only=True)
    assert set(raw["model"]) == set(sd)
    again = load_tokenizer(tmp_path / "mine.pt")
    assert again.weights_hash == tok.weights_hash and again.image_size == 32
    # prefixed (DDP) keys and a checkpoint without the usage buffer also load
    torch.save({"model": {f"module.{k}": v for k, v in sd.items() if k != "quantize.codebook_used"}}, tmp_path / "ddp.pt")
    assert load_tokenizer(tmp_path / "ddp.pt", image_size=32).weights_hash == tok.weights_hash


def test_vq_checkpoint_errors_name_file_and_keys(small_vq, tmp_path):
    sd = small_vq.state_dict()
    broken = dict(sd)
    del broken["decoder.conv_blocks.0.attn.1.q.weight"]
    broken["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"model": broken}, tmp_path / "broken.pt")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / "broken.pt", image_size=32)
    msg = str(e.value)
    assert "broken.pt" in msg and "decoder.conv_blocks.0.attn.1.q.weight" in msg and "decoder.extra.weight" in msg
    wrong = dict(sd)
    wrong["post_quant_conv.weight"] = torch.zeros(32, 4, 1, 1)
    torch.save({"model": wrong}, tmp_path / "shape.pt")
    with pytest.raises(TokenizerError, match=r"post_quant_conv.weight: checkpoint \(32, 4, 1, 1\)"):
        load_tokenizer(tmp_path / "shape.pt", image_size=32)
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(TokenizerError, match="other.pt: not a LlamaGen VQ checkpoint"):
        load_tokenizer(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TokenizerError, match="junk.pt"):
        load_tokenizer(tmp_path / "junk.pt")


def test_vq16_by_name_without_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("STAR_SCALE_VQ16", str(tmp_path / "nowhere.pt"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(TokenizerError, match="vq_ds16_c2i.pt.*patch-kmeans"):
        load_tokenizer("vq16")
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing.pt")
