"""LlamaGen checkpoint import/export: key mapping, strictness, round trips, and
logits against an independent re-implementation of LlamaGen's c2i forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from star_scale.models.gpt import GPT, GPTArgs
from star_scale.models.llamagen_import import (
    LLAMAGEN_HEADS,
    convert_checkpoint,
    export_llamagen,
    import_llamagen,
    infer_args,
    load_llamagen_state_dict,
)
from star_scale.models.model_file import load_model_file

SMALL = dict(layers=2, heads=4, width=64, vocab_size=64, num_classes=10, grid_size=4)


def random_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTArgs(**SMALL))
    with torch.no_grad():  # non-trivial everywhere, incl. the zero-initialised head and unit norms
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.eval()


def llamagen_sd(model):
    """What a LlamaGen training script would have in its state dict (+ runtime buffers it may contain)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 4, 24, 16)
    sd["layers.0.attention.kv_cache.v_cache"] = torch.zeros(2, 4, 24, 16)
    return sd


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


WRAPS = {
    "bare": lambda sd: sd,
    "model": lambda sd: {"model": sd, "optimizer": {}, "steps": 7},
    "module": lambda sd: {"module": sd},
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 1},
    "compiled": lambda sd: {"model": {"_orig_mod." + k: v for k, v in sd.items()}},
    "ddp+compiled": lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()},
}


@pytest.mark.parametrize("wrap", WRAPS)
def test_wrappers_and_prefixes_map_exactly(wrap):
    ref = random_model()
    model = import_llamagen(WRAPS[wrap](llamagen_sd(ref)), heads=4, grid_size=4)
    assert model.args == ref.args
    assert_same(export_llamagen(model), export_llamagen(ref))


def test_load_from_file_with_argparse_namespace(tmp_path):
    import argparse

    ref = random_model()
    path = tmp_path / "c2i.pt"
    torch.save({"model": llamagen_sd(ref), "args": argparse.Namespace(gpt_model="GPT-B"), "steps": 3}, path)
    sd = load_llamagen_state_dict(str(path))
    assert not any("kv_cache" in k for k in sd)
    assert_same(export_llamagen(import_llamagen(str(path), heads=4, grid_size=4)), export_llamagen(ref))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ValueError, match="junk.pt.*not a state dict.*epoch"):
        load_llamagen_state_dict(str(path))
    torch.save([torch.ones(1)], path)
    with pytest.raises(ValueError, match="junk.pt.*found list"):
        load_llamagen_state_dict(str(path))
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: cannot read as a torch checkpoint"):
        load_llamagen_state_dict(str(path))


def test_strict_errors_name_the_key():
    base = llamagen_sd(random_model())
    missing = dict(base)
    del missing["layers.1.ffn_norm.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): layers\.1\.ffn_norm\.weight"):
        import_llamagen(missing, heads=4, grid_size=4)
    extra = dict(base, **{"layers.1.attention.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): layers\.1\.attention\.bias"):
        import_llamagen(extra, heads=4, grid_size=4)
    shape = dict(base, **{"layers.1.attention.wo.weight": torch.zeros(64, 60)})
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wo\.weight \(expected \(64, 64\), got \(64, 60\)\)"):
        import_llamagen(shape, heads=4, grid_size=4)


def test_export_import_is_identity():
    model = random_model()
    exported = export_llamagen(model)
    assert "rope" not in exported and all("freqs_cis" not in k for k in exported)
    assert_same(export_llamagen(import_llamagen(exported, heads=4, grid_size=4)), exported)


# ----------------------------------------------------------------------------
# Independent reference of LlamaGen's c2i forward (complex rotary, explicit attention).
# ----------------------------------------------------------------------------
def reference_logits(sd, heads, grid, labels, tokens, eps=1e-5, base=10000.0):
    W = {k: v.double() for k, v in sd.items()}
    width = W["tok_embeddings.weight"].shape[1]
    hd = width // heads
    nlayers = 1 + max(int(k.split(".")[1]) for k in W if k.startswith("layers."))

    # Rotary as unit complex numbers: hd/2 pairs, the first hd/4 turn with the row, the rest with the column.
    quarter = hd // 4
    theta = base ** (-torch.arange(quarter, dtype=torch.float64) * 4 / hd)
    pos = torch.arange(grid * grid)
    row, col = pos // grid, pos % grid
    angle = torch.cat([row[:, None] * theta, col[:, None] * theta], dim=1)
    rot = torch.polar(torch.ones_like(angle), angle)
    rot = torch.cat([torch.zeros(1, hd // 2, dtype=rot.dtype), rot])  # class position: rotary = 0

    def rotate(x):  # x: (B, S, H, hd); adjacent channels (2i, 2i+1) form one complex number
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(z * rot[: x.shape[1], None, :]).flatten(-2)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    x = torch.cat([W["cls_embedding.embedding_table.weight"][labels][:, None], W["tok_embeddings.weight"][tokens]], 1)
    B, S, _ = x.shape
    future = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    for i in range(nlayers):
        p = lambda n: W[f"layers.{i}.{n}.weight"]
        h = rms(x, p("attention_norm"))
        q, k, v = (h @ p("attention.wqkv").T).split(width, dim=-1)
        q, k, v = (t.reshape(B, S, heads, hd) for t in (q, k, v))
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        attn = scores.masked_fill(future, float("-inf")).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(B, S, width)
        x = x + out @ p("attention.wo").T
        h = rms(x, p("ffn_norm"))
        x = x + (F.silu(h @ p("feed_forward.w1").T) * (h @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    return rms(x, W["norm.weight"]) @ W["output.weight"].T


def test_logits_match_independent_llamagen_reference():
    model = import_llamagen(llamagen_sd(random_model(seed=1)), heads=4, grid_size=4).eval()
    T = 16
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (3, T), generator=g)
    labels = torch.tensor([0, 5, 10])  # 10 = null class
    with torch.no_grad():
        ours = model(tokens[:, :-1], labels).logits  # LlamaGen's eval call: class + first T-1 tokens
    ref = reference_logits(export_llamagen(model), 4, 4, labels, tokens[:, :-1])
    assert ours.shape == (3, T, 64)
    assert ref.abs().max() > 0.1  # the comparison is not vacuous
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# Shape inference
# ----------------------------------------------------------------------------
def fake_sd(layers, width, vocab=16384, classes=1000, hidden=None):
    """Just the tensors infer_args reads, on the meta device (no memory)."""
    m = lambda *s: torch.empty(*s, device="meta")
    hidden = hidden or GPTArgs(width=width, heads=1).ffn_hidden
    sd = {"tok_embeddings.weight": m(vocab, width), "cls_embedding.embedding_table.weight": m(classes + 1, width)}
    for i in range(layers):
        sd[f"layers.{i}.attention.wqkv.weight"] = m(3 * width, width)
        sd[f"layers.{i}.feed_forward.w1.weight"] = m(hidden, width)
    return sd


def test_infer_gpt_b_from_full_meta_model():
    with torch.device("meta"):
        b = GPT(GPTArgs(layers=12, heads=12, width=768))
    args = infer_args(export_llamagen(b))
    assert (args.layers, args.heads, args.width, args.vocab_size, args.num_classes, args.grid_size) == (
        12, 12, 768, 16384, 1000, 16)
    assert infer_args(export_llamagen(b), grid_size=24).seq_len == 1 + 24 * 24


@pytest.mark.parametrize("shape", LLAMAGEN_HEADS)
def test_infer_heads_for_presets(shape):
    assert infer_args(fake_sd(*shape)).heads == LLAMAGEN_HEADS[shape]


def test_infer_errors():
    with pytest.raises(ValueError, match="not a LlamaGen preset.*heads="):
        infer_args(fake_sd(2, 64))
    assert infer_args(fake_sd(2, 64), heads=4).heads == 4
    with pytest.raises(ValueError, match="1024 hidden units but GPTArgs gives 2048"):
        infer_args(fake_sd(12, 768, hidden=1024))
    with pytest.raises(ValueError, match="no 'tok_embeddings.weight'"):
        infer_args({k: v for k, v in fake_sd(12, 768).items() if not k.startswith("tok_")})


# ----------------------------------------------------------------------------
# Model file
# ----------------------------------------------------------------------------
def test_convert_checkpoint_round_trip(tmp_path):
    ref = random_model()
    src, out = tmp_path / "c2i.pt", tmp_path / "sub" / "model.pt"
    torch.save({"model": llamagen_sd(ref)}, src)
    summary = convert_checkpoint(str(src), str(out), heads=4, grid_size=4)
    assert summary["args"]["layers"] == 2 and summary["params"] == ref.num_params()
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    obj = torch.load(out, weights_only=True)
    assert obj["format"] == "star-scale-model-v1" and obj["args"]["heads"] == 4
    loaded = load_model_file(str(out))
    assert loaded.args == ref.args
    assert_same(export_llamagen(loaded), export_llamagen(ref))


def test_load_model_file_rejects_other_files(tmp_path):
    ckpt = tmp_path / "c2i.pt"
    torch.save({"model": llamagen_sd(random_model())}, ckpt)
    with pytest.raises(ValueError, match="c2i.pt: not a star-scale model file.*star-scale-model-v1.*'model'"):
        load_model_file(str(ckpt))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: not a star-scale model file"):
        load_model_file(str(text))
