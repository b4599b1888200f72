"""MFU is per GPU: divided by the tensor-parallel size, against a spec-sheet peak, unknown when unlisted."""
from __future__ import annotations

import pytest
import torch

from star_scale.config import Config
from star_scale.models.build import build_model
from star_scale.objectives.module import build_training_module
from star_scale.train import throughput
from star_scale.train.throughput import Meter, peak_flops

CPU = torch.device("cpu")


def _rate(meter: Meter, tokens: int, seconds: float, monkeypatch) -> dict:
    monkeypatch.setattr(throughput, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: seconds)}))
    meter.t0 = 0.0  # the interval started at 0 and the clock now reads ``seconds``
    meter.add(tokens)
    return meter.read()


def test_mfu_under_tp2_is_half_of_the_same_tokens_per_second_at_tp1(monkeypatch):
    flops = 6e9
    tp1 = _rate(Meter(flops, CPU, tp=1, peak=1e15), 50_000, 2.0, monkeypatch)
    tp2 = _rate(Meter(flops, CPU, tp=2, peak=1e15), 50_000, 2.0, monkeypatch)
    assert tp1["tokens_per_s"] == tp2["tokens_per_s"] == 25_000
    assert tp1["mfu"] == pytest.approx(25_000 * 6e9 / 1e15)
    assert tp2["mfu"] == pytest.approx(tp1["mfu"] / 2)


@pytest.mark.parametrize("name,peak", [  # names as torch.cuda.get_device_name reports them
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA H800", 989e12), ("NVIDIA H800 PCIe", 756e12), ("NVIDIA H20", 148e12), ("NVIDIA B200", 2.25e15),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10", 125e12), ("NVIDIA A10G", 70e12), ("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA RTX 6000 Ada Generation", 364e12), ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA RTX A6000", 155e12), ("Tesla V100-SXM2-32GB", 125e12), ("Tesla V100-PCIE-16GB", 112e12),
    ("AMD Instinct MI300X", 1307e12), ("AMD Instinct MI250X/MI250", 191.5e12),
])
def test_peak_table(name, peak):
    assert peak_flops(name) == peak


def test_a_listed_model_in_an_unlisted_form_or_a_near_name_is_unknown():
    for name in ("NVIDIA H20 NVL", "Tesla V100S-PCIE-32GB", "NVIDIA H100X", "NVIDIA A40"):
        assert peak_flops(name) is None, name


def test_unknown_devices_report_mfu_as_unknown(monkeypatch):
    assert peak_flops("NVIDIA Quantum 9000") is None and peak_flops("cpu") is None
    rate = _rate(Meter(6e9, CPU), 1000, 1.0, monkeypatch)
    assert rate == {"tokens_per_s": 1000.0, "mfu": None}


def test_star_counts_its_teacher_forward():
    cfg = Config()
    cfg.model.preset, cfg.objective.name = "B", "star"
    with torch.device("meta"):
        star = build_training_module(cfg, build_model(cfg))
    a = star.student.args
    forward = star.student.flops_per_token(training=False)
    teacher = forward - 2 * a.width * a.vocab_size  # the teacher skips the output head
    assert star.flops_factor * star.student.flops_per_token() == pytest.approx(3 * forward + teacher)
