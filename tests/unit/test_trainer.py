import json
import logging

import pytest
import torch

from star_scale.models.gpt import GPT, GPTArgs
from star_scale.train.checkpoint import CheckpointDir
from star_scale.train.local_engine import param_groups
from star_scale.train.loop import train


def losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_and_resumed_run_matches_uninterrupted(tiny_cfg, tmp_path):
    full = tiny_cfg(out="full")
    train(full)
    part = tiny_cfg(out="part")
    train(part, stop_after=4)  # checkpoint at step 3, then one more step that is lost
    assert len(losses(part.run_dir())) == 4
    train(part)  # resumes from step 3
    assert losses(part.run_dir()) == losses(full.run_dir())  # exact, fp32 CPU
    assert (part.run_dir() / "config.yaml").is_file()


def test_loss_decreases_on_learnable_data(tiny_cfg):
    cfg = tiny_cfg("train.steps=40", "model.token_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0")
    train(cfg)
    l = losses(cfg.run_dir())
    assert sum(l[-5:]) / 5 < sum(l[:5]) / 5


def test_weight_decay_only_on_matrices():
    groups = param_groups(GPT(GPTArgs(layers=1, heads=4, width=64, vocab_size=16, num_classes=2, grid_size=2)), 0.05)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.05
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 2 * 1 + 1  # two norms per block + the final norm


def test_micro_batches_accumulate_to_the_same_step(tiny_cfg):
    a = tiny_cfg("train.steps=2", "model.token_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0",
                 "model.class_dropout=0", out="a")
    b = tiny_cfg("train.steps=2", "model.token_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0",
                 "model.class_dropout=0", "data.micro_batch=4", out="b")
    train(a), train(b)
    assert losses(a.run_dir()) == pytest.approx(losses(b.run_dir()), rel=1e-5)


def test_truncated_checkpoint_falls_back_with_warning(tmp_path, caplog):
    ckpts = CheckpointDir(tmp_path, keep=3)
    ckpts.save(1, {"state": {"x": torch.ones(100)}})
    ckpts.save(2, {"state": {"x": torch.full((100,), 2.0)}})
    bad = ckpts.path(2) / "state.pt"
    bad.write_bytes(bad.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        step, objs = ckpts.load_latest()
    assert step == 1 and torch.equal(objs["state"]["x"], torch.ones(100))
    assert str(bad) in caplog.text


def test_checkpoints_are_pruned_to_keep(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=2)
    for s in (1, 2, 3):
        ckpts.save(s, {"s": s})
    assert ckpts.steps() == [2, 3]
    assert not list(tmp_path.glob(".tmp-*"))


def test_live_probe_is_logged_and_leaves_training_unchanged(tiny_cfg):
    plain = tiny_cfg(out="plain")
    probed = tiny_cfg("train.probe_every=3", "train.probe_images=128", out="probed")
    train(plain), train(probed)
    records = [json.loads(l) for l in (probed.run_dir() / "metrics.jsonl").read_text().splitlines()]
    accs = [r["probe_acc"] for r in records if "probe_acc" in r]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    assert losses(probed.run_dir()) == losses(plain.run_dir())


def test_usr1_checkpoints_stops_and_resumes_exactly(tiny_cfg):
    """Slurm's --signal=USR1@N: save at the end of the step, stop; the rerun continues the same trajectory."""
    import os
    import signal
    import threading
    import time

    full = tiny_cfg("train.steps=12", "train.ckpt_every=100", out="full")
    train(full)
    cfg = tiny_cfg("train.steps=12", "train.ckpt_every=100", out="signalled")
    metrics = cfg.run_dir() / "metrics.jsonl"

    def signal_after_3_steps():
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=signal_after_3_steps, daemon=True).start()
    first = train(cfg)
    assert first["stopped_by"] == "SIGUSR1" and 3 <= first["step"] < 12
    assert CheckpointDir(cfg.run_dir() / "checkpoints").steps() == [first["step"]]
    assert train(cfg)["step"] == 12
    assert losses(cfg.run_dir()) == losses(full.run_dir())
