"""The trained student of a run folder, for the demo's and the repro's evaluations."""
from __future__ import annotations

from pathlib import Path

import torch

from star_scale.models.build import build_model


def student_from_checkpoint(cfg, run_dir: Path) -> torch.nn.Module:
    from star_scale.train.checkpoint import CheckpointDir

    step, state = CheckpointDir(run_dir / "checkpoints").load_latest()
    weights = {k[len("student."):]: v for k, v in state["engine"]["module"].items() if k.startswith("student.")}
    model = build_model(cfg)
    model.load_state_dict(weights)
    return model.eval()
