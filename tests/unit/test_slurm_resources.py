"""What a training job asks Slurm for: --mem, CPUs for srun's tasks, and a time-limit window that fits a save."""
import subprocess
import sys

import pytest

from star_scale.config import ConfigError, load_config
from star_scale.slurm.resources import (checkpoint_bytes_busiest_node, host_bytes_per_node, mem_line, save_window,
                                        time_limit_seconds)
from star_scale.slurm.plan import GIB, count_params

SUBMIT = [sys.executable, "-m", "star_scale.cli", "submit"]


@pytest.mark.parametrize("spec,seconds", [("30", 1800), ("05:30", 330), ("24:00:00", 86400), ("2-00", 172800),
                                          ("1-02:03", 93780), ("1-00:00:10", 86410), ("INFINITE", None)])
def test_slurm_time_formats(spec, seconds):
    assert time_limit_seconds(spec) == seconds


def test_bad_time_names_the_key():
    with pytest.raises(ConfigError, match=r"cluster.time='tomorrow': expected a Slurm time"):
        time_limit_seconds("tomorrow")


def test_mem_line_values():
    cfg = load_config("recipes/3B-star.yaml")
    n, _ = count_params(cfg)
    # Today's start-up builds student + teacher in fp32 on every rank: 8 bytes/param x 8 ranks: a 3B node
    # needs more than 200 GiB, which the job must ask for.
    assert host_bytes_per_node(cfg) > 8 * 8 * n
    # An asynchronous save holds each rank's checkpoint share on the host while it writes.
    grown = host_bytes_per_node(load_config("recipes/3B-star.yaml", ["train.async_save=true"]))
    assert grown - host_bytes_per_node(cfg) == pytest.approx(8 * 16 * n / 16)
    assert mem_line(cfg) == f"#SBATCH --mem={-(-int(host_bytes_per_node(cfg)) // GIB)}G"
    assert mem_line(load_config("recipes/3B-star.yaml", ["cluster.mem=node"])) == "#SBATCH --mem=0"
    assert mem_line(load_config("recipes/3B-star.yaml", ["cluster.mem=512G"])) == "#SBATCH --mem=512G"
    assert mem_line(load_config("recipes/3B-star.yaml", ["cluster.mem=none"])) == ""
    with pytest.raises(ConfigError, match=r"cluster.mem='lots': expected auto, node"):
        mem_line(load_config("recipes/3B-star.yaml", ["cluster.mem=lots"]))


def test_save_window_grows_with_checkpoint_size_and_slow_filesystems():
    b = save_window(load_config("recipes/B-star.yaml"))
    assert b.signal_seconds == 300 and not b.note  # B saves in seconds: the default window stands
    slow = save_window(load_config("recipes/3B-star.yaml", ["cluster.ckpt_write_gbs=0.1"]))
    cfg = load_config("recipes/3B-star.yaml")
    # Each of the 16 ranks writes 1/16 of 16 bytes/param (fp32 masters, AdamW moments, teacher): 25 GB per node.
    assert slow.bytes == checkpoint_bytes_busiest_node(cfg) == pytest.approx(8 * 16 * count_params(cfg)[0] / 16)
    assert slow.signal_seconds > 300 and slow.signal_seconds >= slow.seconds
    assert "cluster.signal_seconds raised from 300 to" in slow.note and "cluster.ckpt_write_gbs=0.1" in slow.note
    assert slow.save_wait < slow.signal_seconds  # the batch script requeues before the limit kills the job


def test_a_window_that_cannot_fit_is_refused():
    with pytest.raises(ConfigError, match=r"cluster.time=00:05:00: a checkpoint needs about \d+ s"):
        save_window(load_config("recipes/3B-star.yaml", ["cluster.time=00:05:00", "cluster.ckpt_write_gbs=0.1"]))
    with pytest.raises(ConfigError, match=r"cluster.ckpt_write_gbs=0.0: expected the write bandwidth"):
        save_window(load_config("recipes/3B-star.yaml", ["cluster.ckpt_write_gbs=0"]))


def test_rendered_script_binds_cpus_memory_and_requeues_from_the_batch_shell():
    out = subprocess.run([*SUBMIT, "recipes/3B-star.yaml", "cluster.ckpt_write_gbs=0.1", "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    script, window = out.stdout, save_window(load_config("recipes/3B-star.yaml", ["cluster.ckpt_write_gbs=0.1"]))
    assert "star-scale submit: cluster.signal_seconds raised from 300" in out.stderr
    assert f"#SBATCH --signal=B:USR1@{window.signal_seconds}\n" in script
    assert "#SBATCH --mem=" in script and "export SRUN_CPUS_PER_TASK=8\n" in script
    assert "srun --job-name=star-scale-train --kill-on-bad-exit=1 --cpus-per-task=8 " in script
    assert f"for _ in $(seq {window.save_wait})" in script and "trap on_usr1 USR1" in script
    assert "if [ 600 -gt 0 ]; then" in script and "-ge 600 ]" in script  # a step that cannot start: requeue
    assert "@" not in script.replace("USR1@", "")  # every placeholder filled


def test_submit_refuses_a_window_too_short_before_sbatch():
    out = subprocess.run([*SUBMIT, "recipes/3B-star.yaml", "cluster.ckpt_write_gbs=0.1", "--time", "00:05:00",
                          "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "cluster.time=00:05:00: a checkpoint needs about" in out.stderr
