"""ST-AR objectives against hand-computed values: InfoNCE, cosine distance, masks, positions."""
import math

import pytest
import torch

from star_scale.models.gpt import GPT, GPTArgs
from star_scale.objectives.contrastive import (Projector, contrastive_losses, gather_at, gather_negatives,
                                               info_nce)
from star_scale.objectives.masks import masked_count, mim_key_mask, sample_positions
from star_scale.objectives.mim import cosine_distance, cosine_similarity, last_layer_features


def tiny_gpt(**kw) -> GPT:
    args = dict(layers=2, heads=2, width=32, vocab_size=32, num_classes=4, grid_size=4,
                class_dropout=0.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    args.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTArgs(**args))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # non-zero head: logits depend on the states
    return model.eval()


# ---- InfoNCE ------------------------------------------------------------------
def test_info_nce_three_samples_by_hand():
    # Anchors a_i, positives p_i; the negatives of anchor i are the other samples' positives.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    tau = 0.5
    # Cosines:      p1     p2     p3
    #   a1:          1      0     -1
    #   a2:          0      1      0
    #   a3:        1/r2   1/r2  -1/r2
    # loss_i = -log(e^{s_ii/tau} / sum_j e^{s_ij/tau}):
    l1 = math.log(1 + math.exp(-2) + math.exp(-4))  # e^2 vs e^0, e^-2
    l2 = math.log(1 + 2 * math.exp(-2))  # e^2 vs e^0, e^0
    l3 = math.log(1 + 2 * math.exp(2 * math.sqrt(2)))  # e^-r2 vs e^r2, e^r2
    expected = (l1 + l2 + l3) / 3
    assert expected == pytest.approx(1.311058, abs=1e-6)  # the same, worked out on paper
    loss, acc = info_nce(a, p[:, None], p, ~torch.eye(3, dtype=torch.bool), tau)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert acc.item() == pytest.approx(2 / 3)  # anchors 1 and 2 rank their positive first, 3 does not


def test_info_nce_multi_positive_is_mean_of_pairs():
    torch.manual_seed(1)
    a, pos, neg = torch.randn(5, 8), torch.randn(5, 3, 8), torch.randn(7, 8)
    loss, _ = info_nce(a, pos, neg, None, 0.2)
    singles = [info_nce(a, pos[:, j : j + 1], neg, None, 0.2)[0] for j in range(3)]
    assert loss.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-6)


def test_info_nce_is_scale_invariant_and_gradient_only_through_anchors():
    a = torch.randn(4, 6, requires_grad=True)
    pos, neg = torch.randn(4, 1, 6), torch.randn(9, 6)
    l1, _ = info_nce(a, pos, neg, None, 0.3)
    l2, _ = info_nce(3 * a, 0.5 * pos, 7 * neg, None, 0.3)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)
    l1.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


# ---- cosine distance ------------------------------------------------------------
def test_cosine_distance_by_hand():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [3.0, 0.0]])
    # cos = 1, 0, 0 -> distances 0, 1, 1 -> mean 2/3
    assert cosine_similarity(s, t).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-7)
    assert cosine_distance(s, t).item() == pytest.approx(2 / 3, rel=1e-6)
    # Opposite vectors: distance 2.
    assert cosine_distance(torch.tensor([[1.0, 2.0]]), torch.tensor([[-2.0, -4.0]])).item() == pytest.approx(2.0)


def test_cosine_distance_gradient_only_to_student():
    s = torch.randn(2, 3, 5, requires_grad=True)
    t = torch.randn(2, 3, 5, requires_grad=True)
    cosine_distance(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_last_layer_features_choice():
    model = tiny_gpt()
    h = torch.randn(2, 3, 32)
    assert torch.equal(last_layer_features(model, h, "block"), h)
    assert torch.equal(last_layer_features(model, h, "norm"), model.norm(h))
    with pytest.raises(ValueError):
        last_layer_features(model, h, "other")


# ---- MIM key mask ----------------------------------------------------------------
def test_mask_counts_class_token_and_ratio():
    torch.manual_seed(0)
    b, s, r = 256, 257, 0.25
    mask = mim_key_mask(b, s, r)
    assert mask.shape == (b, s) and mask.dtype == torch.bool
    assert mask[:, 0].all()  # the class token is never masked
    masked = (~mask).sum(1)
    assert masked_count(s, r) == 64
    assert (masked == 64).all()  # exactly round(r * (S - 1)) image columns per sequence
    assert (masked.float() / (s - 1) - r).abs().max() <= 0.5 / (s - 1)
    assert len({tuple(row.tolist()) for row in mask}) == b  # a fresh draw per sequence
    # Uniform over image columns: each is masked about r of the time.
    freq = (~mask[:, 1:]).float().mean(0)
    assert freq.mean().item() == pytest.approx(r, abs=1e-6)
    assert (freq - r).abs().max() < 0.15


def test_mask_ratio_zero_is_no_mask():
    assert mim_key_mask(3, 17, 0.0) is None
    assert mim_key_mask(3, 17, 0.01) is None  # rounds to no column on 16 image positions


def test_mask_uses_torch_rng():
    torch.manual_seed(5)
    a = mim_key_mask(4, 33, 0.3)
    torch.manual_seed(5)
    assert torch.equal(a, mim_key_mask(4, 33, 0.3))


def test_masked_forward_r0_equals_plain_forward_exactly():
    model = tiny_gpt()
    tokens, labels = torch.randint(0, 32, (3, 15)), torch.tensor([0, 1, 2])
    plain = model(tokens, labels, return_layers=(1, 2))
    # r = 0 draws no mask at all: the student's forward is the plain one.
    assert mim_key_mask(3, 16, 0.0) is None
    # Even an explicit all-visible key mask reproduces the plain causal forward bit for bit.
    full = model(tokens, labels, key_mask=torch.ones(3, 16, dtype=torch.bool), return_layers=(1, 2))
    assert torch.equal(plain.logits, full.logits)
    assert all(torch.equal(plain.hidden[i], full.hidden[i]) for i in (1, 2))


def test_mask_never_blanks_a_row_and_keeps_own_position():
    model = tiny_gpt()
    tokens, labels = torch.randint(0, 32, (2, 15)), torch.tensor([1, 3])
    s = 16
    # The harshest mask: every image column hidden; only the class token and each
    # query's own position stay visible, in every layer.
    key_mask = torch.zeros(2, s, dtype=torch.bool)
    key_mask[:, 0] = True
    out = model(tokens, labels, key_mask=key_mask)
    assert torch.isfinite(out.logits).all()  # no softmax row was all -inf
    q = 6  # sequence position q holds tokens[:, q - 1]
    changed = tokens.clone()
    changed[:, q - 1] = (changed[:, q - 1] + 1) % 32
    out2 = model(changed, labels, key_mask=key_mask)
    diff = (out.logits - out2.logits).abs().amax(dim=(0, 2))
    assert diff[q] > 0  # the query sees its own position
    assert (diff[torch.arange(s) != q] == 0).all()  # nobody else sees the masked column q


def test_masked_column_invisible_in_every_layer():
    model = tiny_gpt()
    tokens, labels = torch.randint(0, 32, (1, 15)), torch.tensor([2])
    key_mask = torch.ones(1, 16, dtype=torch.bool)
    key_mask[0, 4] = False
    out = model(tokens, labels, key_mask=key_mask)
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 32  # the token at sequence position 4
    out2 = model(changed, labels, key_mask=key_mask)
    diff = (out.logits - out2.logits).abs().amax(dim=(0, 2))
    assert (diff[:4] == 0).all()  # causal
    assert diff[4] > 0  # own position
    # Column 4 is hidden in every layer, so its token reaches no later position at all.
    assert (diff[5:] == 0).all()


# ---- positions -------------------------------------------------------------------
def test_sample_positions_distinct_image_positions():
    torch.manual_seed(0)
    pos = sample_positions(500, 17, 4)
    assert pos.shape == (500, 4)
    assert pos.min() >= 1 and pos.max() <= 16  # never the class position
    assert all(len(set(row.tolist())) == 4 for row in pos)
    counts = torch.bincount(pos.flatten(), minlength=17)[1:].float()
    assert (counts / counts.mean() - 1).abs().max() < 0.3  # roughly uniform
    with pytest.raises(ValueError):
        sample_positions(1, 5, 5)


# ---- contrastive losses ----------------------------------------------------------
def _reference(anchors, teacher, positions, tau, which):
    """Per-pair loops over the documented positive and negative sets."""
    b, m, k, w = anchors.shape
    sampled = torch.stack([torch.stack([teacher[n, v, positions[n, v]] for v in range(m)]) for n in range(b)])
    losses, wins = [], []
    for n in range(b):
        negatives = torch.cat([sampled[o].reshape(-1, w) for o in range(b) if o != n])
        for v in range(m):
            for i in range(k):
                if which == "step":
                    positives = [sampled[n, v, j] for j in range(k) if j != i]
                else:
                    positives = [teacher[n, u, positions[n, v, i]] for u in range(m) if u != v]
                for p in positives:
                    loss, acc = info_nce(anchors[n, v, i][None], p[None, None], negatives, None, tau)
                    losses.append(loss)
                    wins.append(acc)
    return torch.stack(losses).mean(), torch.stack(wins).mean()


@pytest.mark.parametrize("views", [2, 3])
def test_contrastive_losses_match_reference(views):
    torch.manual_seed(0)
    b, k, s, w, tau = 3, 3, 9, 8, 0.2
    anchors = torch.randn(b, views, k, w)
    teacher = torch.randn(b, views, s, w)
    positions = torch.stack([torch.randperm(s - 1)[:k] + 1 for _ in range(b * views)]).view(b, views, k)
    out = contrastive_losses(anchors, teacher, positions, tau)
    for which in ("step", "view"):
        ref_loss, ref_acc = _reference(anchors, teacher, positions, tau, which)
        assert out[f"loss_{which}"].item() == pytest.approx(ref_loss.item(), rel=1e-5)
        assert out[f"acc_{which}"].item() == pytest.approx(ref_acc.item())


def test_contrastive_perfect_features_rank_first():
    # Teacher features one-hot per image position; anchors equal to their positives.
    b, m, k, s = 2, 2, 2, 5
    w = b * s
    teacher = torch.zeros(b, m, s, w)
    for n in range(b):
        for p in range(s):
            teacher[n, :, p, n * s + p] = 1.0  # both views agree; images and positions orthogonal
    positions = torch.tensor([[[1, 2], [1, 2]], [[3, 4], [3, 4]]])
    anchors = gather_at(teacher.flatten(0, 1), positions.flatten(0, 1)).view(b, m, k, w)
    out = contrastive_losses(anchors, teacher, positions, 0.1, step=False)
    assert set(out) == {"loss_view", "acc_view"}
    assert out["acc_view"].item() == 1.0
    # Positive cosine 1, the 4 negatives (other image's sampled features) cosine 0.
    assert out["loss_view"].item() == pytest.approx(math.log(1 + 4 * math.exp(-10)), abs=2e-6)
    step = contrastive_losses(anchors, teacher, positions, 0.1, view=False)
    assert set(step) == {"loss_step", "acc_step"}
    # Step positive (another position) is orthogonal too: cosine 0 against 4 cosine-0 negatives.
    assert step["loss_step"].item() == pytest.approx(math.log(5), rel=1e-5)


def test_contrastive_gradient_only_through_anchors():
    anchors = torch.randn(2, 2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 2, 6, 4, requires_grad=True)
    positions = torch.tensor([1, 2, 3]).expand(2, 2, 3)
    out = contrastive_losses(anchors, teacher, positions, 0.2)
    (out["loss_step"] + out["loss_view"]).backward()
    assert anchors.grad.abs().sum() > 0 and teacher.grad is None


def test_gather_negatives_single_process_is_identity():
    x = torch.randn(3, 4)
    y, offset = gather_negatives(x)
    assert y is x and offset == 0


def test_projector_shape_and_default_width():
    p = Projector(16)
    assert p.fc1.out_features == 16 and p(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    assert Projector(16, 40).fc1.out_features == 40
