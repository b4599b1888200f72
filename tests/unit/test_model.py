import pytest
import torch

from star_scale.models.generate import filter_logits, generate
from star_scale.models.gpt import GPT, GPTArgs, rope_complex, rope_real, rope_table_2d

ARGS = GPTArgs(layers=2, heads=4, width=64, vocab_size=64, num_classes=4, grid_size=4)


def random_model(dtype=torch.float32, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ARGS).to(dtype)
    for p in model.parameters():  # the head is zero-initialised: randomise everything
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_output_shapes_and_hidden_layers():
    model = random_model()
    tokens = torch.randint(0, 64, (3, 15))
    out = model(tokens, torch.tensor([0, 1, 2]), return_layers=(1, 2))
    assert out.logits.shape == (3, 16, 64) and out.logits.dtype == torch.float32
    assert set(out.hidden) == {1, 2} and out.hidden[1].shape == (3, 16, 64)


def test_zero_init_head_gives_uniform_predictions():
    out = GPT(ARGS)(torch.randint(0, 64, (2, 15)), torch.tensor([0, 1]))
    assert torch.all(out.logits == 0)


def test_rope_class_position_is_zero_and_layout():
    table = rope_table_2d(grid_size=4, head_dim=16)
    assert table.shape == (17, 8, 2)
    assert torch.all(table[0] == 0)
    # token (row 1, col 2) = position 1 + 1*4 + 2: first 4 pairs rotate by row, last 4 by column
    pos = 1 + 4 + 2
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    assert torch.allclose(table[pos, :4, 0], torch.cos(1 * inv))
    assert torch.allclose(table[pos, 4:, 1], torch.sin(2 * inv))


def test_all_visible_key_mask_equals_plain_forward():
    model = random_model()
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([1, 3])
    plain = model(tokens, labels).logits
    masked = model(tokens, labels, key_mask=torch.ones(2, 16, dtype=torch.bool)).logits
    assert torch.allclose(plain, masked, atol=1e-6)


def test_key_mask_hides_keys():
    model = random_model()
    tokens, labels = torch.randint(0, 64, (1, 15)), torch.tensor([1])
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, 3] = False
    a = model(tokens, labels, key_mask=mask).logits
    b = model(tokens, labels).logits
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)  # earlier queries never saw key 3
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-4)


def test_incremental_forward_equals_full_forward():
    model = random_model(torch.float64)
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([0, 2])
    full = model(tokens, labels).logits
    cache = model.new_cache(2)
    steps = [model(None, labels, cache=cache).logits]
    for i in range(15):
        steps.append(model(tokens[:, i : i + 1], None, cache=cache).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_and_uncached_generation_give_identical_tokens(dtype, cfg_scale):
    model = random_model(dtype)
    labels = torch.tensor([0, 1, 2, 3])
    kw = dict(cfg_scale=cfg_scale, temperature=1.0, top_k=20, top_p=0.9)
    cached = generate(model, labels, generator=torch.Generator().manual_seed(7), use_cache=True, **kw)
    uncached = generate(model, labels, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert cached.shape == (4, 16)
    assert torch.equal(cached, uncached)


def test_greedy_generation_is_argmax_of_full_forward():
    model = random_model(torch.float64)
    labels = torch.tensor([1, 2])
    tokens = generate(model, labels, temperature=0.0)
    logits = model(tokens[:, :-1], labels).logits
    assert torch.equal(logits.argmax(-1), tokens)


def test_cfg_interval_zero_equals_unguided_conditional():
    model = random_model(torch.float64)
    labels = torch.tensor([1, 2])
    a = generate(model, labels, cfg_scale=4.0, cfg_interval=0.0, generator=torch.Generator().manual_seed(1))
    b = generate(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75 <= 0.8


def test_class_dropout_uses_null_class():
    torch.manual_seed(0)
    model = GPT(GPTArgs(**{**ARGS.__dict__, "class_dropout": 1.0})).train()
    null = model.cls_embedding.embedding_table.weight[4]
    emb = model.cls_embedding(torch.tensor([0, 1, 2]))
    assert torch.equal(emb[:, 0], null.expand(3, -1))


def test_bad_head_split_is_refused():
    with pytest.raises(ValueError, match="width 100"):
        GPT(GPTArgs(layers=1, heads=12, width=100))


def test_meta_build_materialized_unit_by_unit_equals_a_build_in_place():
    torch.manual_seed(3)
    direct = GPT(ARGS)
    after_direct = torch.rand(4)  # the global stream after construction
    torch.manual_seed(3)
    with torch.device("meta"):
        lazy = GPT(ARGS)
    after_lazy = torch.rand(4)
    assert torch.equal(after_direct, after_lazy) and lazy.is_meta()
    seen = []

    def after_unit(unit):  # every earlier unit is allocated, every later one still on meta
        seen.append(sum(p.numel() for p in lazy.parameters() if not p.is_meta))
    lazy.materialize("cpu", after_unit=after_unit)
    assert len(seen) == len(lazy.units()) == ARGS.layers + 4 and seen == sorted(set(seen))
    assert seen[-1] == direct.num_params() and not lazy.is_meta()
    assert direct.state_dict().keys() == lazy.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), lazy.state_dict().values()))
    assert torch.equal(direct.rope, lazy.rope)
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([0, 3])
    assert torch.equal(direct.eval()(tokens, labels).logits, lazy.eval()(tokens, labels).logits)


def test_initial_values_depend_on_seed_and_name_only():
    a, b = GPT(ARGS, init_seed=7), GPT(ARGS, init_seed=7)
    c = GPT(ARGS, init_seed=8)
    name = "layers.1.attention.wqkv.weight"
    w = dict(a.named_parameters())[name]
    assert torch.equal(w, dict(b.named_parameters())[name]) and not torch.equal(w, dict(c.named_parameters())[name])
    assert torch.equal(w, a.initial_value(name, w.shape))  # made alone, out of order: the same value
    assert abs(w.std().item() - ARGS.init_std) < 0.002
    other = dict(a.named_parameters())["layers.0.attention.wqkv.weight"]
    assert not torch.equal(w, other)  # every weight its own stream
    assert torch.all(a.output.weight == 0) and torch.all(a.norm.weight == 1)


@pytest.mark.parametrize("odd_strides", [False, True])
def test_complex_rope_is_the_real_rotation_bit_for_bit(odd_strides):
    """Eager mode rotates by one complex multiply, compiled code by the real form: same bits, both ways."""
    table = rope_table_2d(grid_size=4, head_dim=16)
    g = torch.Generator().manual_seed(0)
    # q out of a fused qkv projection (non-contiguous), or a tensor whose strides are odd
    base = torch.randn(2, 17, 3 * 4 * 16, generator=g) if not odd_strides else torch.randn(2, 17, 4, 17, generator=g)
    grads = torch.randn(2, 17, 4, 16, generator=g)
    outs = []
    for rope in (rope_real, rope_complex):
        leaf = base.clone().requires_grad_()
        x = leaf.unflatten(-1, (3, 4, 16))[:, :, 0] if not odd_strides else leaf[..., :16]
        out = rope(x, table)
        out.backward(grads)
        outs.append((out.detach(), leaf.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=0)
