"""Step metrics stay on the device until they are read, so the hot path never waits for the GPU.

Engines return 0-dim device tensors from ``train_step_lazy``; the loop keeps
them here and reads every pending step with one device-to-host copy at
``log_every`` boundaries (and before checkpoints, probes and the end).
"""
from __future__ import annotations

import torch


def read_metrics(metrics: dict) -> dict:
    """{name: 0-dim tensor or number} -> {name: float}, with one copy for all tensors."""
    return read_many([metrics])[0]


def read_many(records: list[dict]) -> list[dict]:
    tensors = [v for r in records for v in r.values() if isinstance(v, torch.Tensor)]
    values = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist() if tensors else [])
    return [{k: next(values) if isinstance(v, torch.Tensor) else v for k, v in r.items()} for r in records]


def accumulate(totals: dict, metrics: dict, weight: float) -> None:
    """totals[k] += weight * metrics[k], as device tensors (no host read)."""
    for k, v in metrics.items():
        v = v.detach().float() * weight
        totals[k] = totals[k] + v if k in totals else v


class PendingMetrics:
    """Records of the steps not yet read: ``add`` each step, ``flush`` -> their float records, in order."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, step: int, metrics: dict) -> None:
        self.records.append({"step": step, **metrics})

    def update_last(self, **values) -> None:
        self.records[-1].update(values)

    def flush(self) -> list[dict]:
        out, self.records = read_many(self.records), []
        return out
