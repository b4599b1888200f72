"""CUDA_DEVICE_MAX_CONNECTIONS: the trainer's rule (tp > 1, only when unset) and the Slurm script's."""
from __future__ import annotations

import subprocess

from star_scale.config import Config
from star_scale.parallel.layout import one_device_queue_for_tp
from star_scale.slurm.submit import render


def test_set_at_tp_above_1_only_and_never_over_a_users_value():
    for tp, env, expected in ((2, {}, "1"), (1, {}, None), (4, {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}, "8")):
        one_device_queue_for_tp(tp, env)
        assert env.get("CUDA_DEVICE_MAX_CONNECTIONS") == expected, tp


def _script_sets(tp: int, preset: str = "") -> str:
    cfg = Config(name="q")
    cfg.parallel.tp = tp
    script = render(cfg, ["train", f"parallel.tp={tp}"], "0")
    line = next(l for l in script.splitlines() if "CUDA_DEVICE_MAX_CONNECTIONS" in l and not l.startswith("#"))
    out = subprocess.run(["bash", "-c", f"set -euo pipefail; {preset} {line}; echo ${{CUDA_DEVICE_MAX_CONNECTIONS-unset}}"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_train_sbatch_exports_it_for_tensor_parallel_jobs():
    assert _script_sets(2) == "1"
    assert _script_sets(1) == "unset"
    assert _script_sets(2, "export CUDA_DEVICE_MAX_CONNECTIONS=8;") == "8"
