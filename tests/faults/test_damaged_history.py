"""Every checkpoint damaged: `train` refuses and changes nothing; train.restart=true moves the history aside."""
import torch

from star_scale.train.checkpoint import CheckpointDir
from tests.faults.conftest import cli, errors, metrics, tree


def history(run):
    """Every file of the run but the lock, whose content names the latest holder."""
    return {k: v for k, v in tree(run).items() if k != "train.lock"}


def test_every_checkpoint_damaged_refuses_and_deletes_nothing(train_args, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args(run, "train.steps=6")).returncode == 0
    ckpts = CheckpointDir(run / "checkpoints")
    assert ckpts.steps() == [3, 6]
    truncated, flipped = ckpts.path(6) / "engine.pt", ckpts.path(3) / "trainer.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    before = history(run)

    refused = cli(*train_args(run, "train.steps=12"))
    assert refused.returncode == 2
    [message] = [l for l in errors(refused.stderr)]
    assert message.startswith("star-scale: error: ") and "train.restart=true" in message
    for what in (f"{truncated}: 1000 bytes, expected", f"{flipped}: checksum mismatch", "metrics.jsonl (6 lines)"):
        assert what in message
    assert history(run) == before  # nothing deleted, truncated or rewritten (config.yaml included)

    restarted = cli(*train_args(run, "train.steps=6", "train.restart=true"))
    assert restarted.returncode == 0, restarted.stderr
    [aside] = run.glob("restart-*")
    assert {f"{aside.name}/{k}": v for k, v in before.items() if k.startswith(("checkpoints/", "metrics"))} \
        == {k: v for k, v in tree(run).items() if k.startswith(aside.name)}
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_pruning_keeps_the_checkpoint_just_written_over_newer_damaged_ones(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=2)
    for s in (2, 4, 6):
        ckpts.save(s, {"x": torch.full((4,), float(s))})
    (ckpts.path(6) / "x.pt").write_bytes(b"")  # damaged: the run resumes from 4 and saves 5
    ckpts.save(5, {"x": torch.full((4,), 5.0)})
    assert ckpts.steps() == [4, 5, 6]  # 5 (whole) and one older kept; the damaged 6 waits to be overwritten
    assert ckpts.verify(5) is None


def test_unfinished_checkpoint_folders_are_swept_at_start(tmp_path):
    from star_scale.config import load_config
    from star_scale.train import run_folder

    leftovers = [tmp_path / "run" / "checkpoints" / n for n in (".tmp-step_00000005-4242", ".tmp-step_00000006")]
    for d in leftovers:
        d.mkdir(parents=True)
        (d / "engine.pt").write_bytes(b"half")
    with run_folder.claim(load_config(None, [f"train.out_dir={tmp_path / 'run'}"]), is_main=True):
        assert not any(d.exists() for d in leftovers)
