"""`train.compile` under DeepSpeed ZeRO-3 is refused until it is tested on a GPU: compiling a block would
trace ZeRO-3's parameter gather/release hooks.  One process (the local engine) still compiles."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from star_scale.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[2]
REFUSAL = ("train.compile=true with parallel.zero_stage=3: expected train.compile=false or "
           "parallel.zero_stage<=2 on more than one rank (one process may compile)")


def _cfg(**parallel) -> Config:
    cfg = Config()
    cfg.model.preset, cfg.data.global_batch, cfg.train.compile = "tiny", 8, True
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def test_compile_with_zero3_is_refused_on_more_than_one_rank_only():
    with pytest.raises(ConfigError) as e:
        _cfg().validate(world_size=2)
    assert str(e.value) == REFUSAL
    with pytest.raises(ConfigError, match="train.compile=true with parallel.zero_stage=3"):
        _cfg(tp=2).validate()  # TP runs the DeepSpeed engine even before the world size is known
    _cfg().validate(world_size=1)  # the local engine
    _cfg(zero_stage=2).validate(world_size=2)


def test_the_launched_command_exits_2_with_one_line_before_start_up(tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "star_scale.cli", "train", "model.preset=tiny", "data.global_batch=8",
                           "train.compile=true", f"train.out_dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"star-scale: config error: {REFUSAL}"]
    assert not (tmp_path / "run").exists()
