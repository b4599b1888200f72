"""Linear probing: positions, features (null class, averaged steps), the probe, LARS, the CLI."""
import json

import numpy as np
import pytest
import torch

from star_scale.data.store import save_npz_store
from star_scale.evaluate.probe import LARS, extract_features, linear_probe, main, probe_accuracy, probe_positions
from star_scale.models.gpt import GPT, GPTArgs
from star_scale.models.model_file import save_model_file

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTArgs(layers=4, heads=2, width=32, vocab_size=64, num_classes=4, grid_size=4, ffn_multiple_of=32))


def class_tokens(n, seed):
    """Tokens whose class shows in which quarter of the vocabulary they come from."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    tokens = labels[:, None] * 16 + rng.integers(0, 16, (n, 16))
    return tokens, labels


def test_positions_are_uniform_and_end_at_the_last_token():
    assert probe_positions(256, 8) == [32, 64, 96, 128, 160, 192, 224, 256]
    assert probe_positions(16, 8) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert probe_positions(16, 1) == [16]
    with pytest.raises(ValueError, match="steps=17"):
        probe_positions(16, 17)


def test_features_are_the_null_class_layer_average(model):
    tokens = torch.randint(0, 64, (5, 16))
    model.train()
    feats = extract_features(model, tokens, layer=2, steps=4, batch_size=2)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        h = model(tokens, torch.full((5,), 4), return_layers=(2,), logits=False).hidden[2]
    torch.testing.assert_close(feats, h[:, [4, 8, 12, 16]].mean(1))
    with pytest.raises(ValueError, match="layer=9"):
        extract_features(model, tokens, layer=9)


def separable(n, seed, d=64, c=10):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(c, d))
    y = rng.integers(0, c, n)
    return centers[y] + rng.normal(size=(n, d)), y


def test_probe_on_separable_features_beats_95_percent():
    (x, y), (xv, yv) = separable(2000, 0), separable(500, 1)
    acc = linear_probe(x, y, xv, yv, num_classes=10, optimizer="sgd", batch_size=256, epochs=10, warmup_epochs=1)
    assert acc > 0.95


def test_probe_on_random_features_is_near_chance():
    rng = np.random.default_rng(2)
    x, xv = rng.normal(size=(2000, 64)), rng.normal(size=(1000, 64))
    y, yv = rng.integers(0, 10, 2000), rng.integers(0, 10, 1000)
    acc = linear_probe(x, y, xv, yv, num_classes=10, optimizer="sgd", batch_size=256, epochs=10, warmup_epochs=1)
    assert 0.05 < acc < 0.16  # chance is 0.10


def test_lars_step_matches_the_mae_formula():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt.step()
    dp = torch.tensor([[0.3, 1.4]])  # grad + wd * w
    expected_w = torch.tensor([[3.0, 4.0]]) - 0.5 * (0.001 * 5 / dp.norm()) * dp
    torch.testing.assert_close(w.detach(), expected_w)
    torch.testing.assert_close(b.detach(), torch.tensor([0.0]))  # 1-dim: plain momentum SGD, no decay


def test_probe_accuracy_of_a_model_on_class_revealing_tokens(model):
    (tr, ytr), (va, yva) = class_tokens(400, 0), class_tokens(200, 1)
    acc = probe_accuracy(model, tr, ytr, va, yva, layer=2, epochs=15, batch_size=64)
    assert acc > 0.95
    rng = np.random.default_rng(3)
    chance = probe_accuracy(model, rng.integers(0, 64, (400, 16)), rng.integers(0, 4, 400),
                            rng.integers(0, 64, (400, 16)), rng.integers(0, 4, 400), layer=2, epochs=15, batch_size=64)
    assert chance < 0.4  # 4 classes: 0.25


def test_cli_on_a_token_store(model, tmp_path):
    tokens, labels = class_tokens(300, 4)
    codes = np.stack([tokens, tokens], axis=1).astype(np.uint16)  # (N, 2 crops, T)
    save_npz_store(tmp_path / "tokens.npz", codes, labels.astype(np.int32), codebook_size=64, num_classes=4)
    save_model_file(model, tmp_path / "model.pt")
    out = tmp_path / "probe.json"
    assert main([str(tmp_path / "model.pt"), "--data", str(tmp_path / "tokens.npz"), "--optimizer", "sgd",
                 "--batch-size", "64", "--epochs", "10", "--warmup-epochs", "1", "--crop", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["layer"] == 2 and result["steps"] == 8 and result["val"] == 30 and result["train"] == 270
    assert result["top1"] > 0.9
    assert main([str(tmp_path / "model.pt"), "--data", str(tmp_path / "tokens.npz"), "--crop", "2"]) == 2
