"""Every bad input named in one line: exit 2, `config error: KEY=VALUE: ...` naming the key or file, no traceback,
and nothing written (no run folder) before the checks pass.

The table runs ``star_scale.cli.main`` in this process (the command's own entry point, fast); one case runs as
its own process to pin down the exit status and stderr of the real command.
"""
import os
import subprocess

import pytest
from PIL import Image

from star_scale import cli as star_cli
from tests.faults.conftest import cli, errors


@pytest.fixture
def read_only(tmp_path):
    """A read-only folder: a read-only tmpfs as root (root writes through chmod), else chmod 555."""
    where = tmp_path / "ro"
    where.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root cannot mount a read-only tmpfs here, and chmod does not stop root")
        where.chmod(0o555)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True) if mounted else where.chmod(0o755)


def cases(tmp, ro):
    images = tmp / "images" / "cat"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(images / "0.png")
    (tmp / "a_file").write_text("x")
    return [  # (overrides, the text the one line must hold)
        (["optimizer.lr=-0.001"], "config error: optimizer.lr=-0.001: expected a number > 0"),
        (["train.ckpt_every=0"], "config error: train.ckpt_every=0: expected an integer >= 1"),
        (["train.log_every=0"], "config error: train.log_every=0: expected an integer >= 1"),
        (["train.steps=-5"], "config error: train.steps=-5: expected an integer >= 1"),
        (["train.steps=many"], "config error: train.steps='many': expected int"),
        (["model.token_dropout=1.0"], "config error: model.token_dropout=1.0: expected a ratio in [0, 1)"),
        (["objective.mask_ratio=1.5"], "config error: objective.mask_ratio=1.5: expected 0 <= r < 1"),
        (["data.micro_batch=3"], "config error: data.micro_batch=3: expected a divisor of the per-rank batch 8"),
        (["parallel.tp=3"], "config error: parallel.tp=3: expected a divisor of model.heads=4"),
        (["parallel.tp=2"], "config error: parallel.tp=2: expected a divisor of the world size 1"),
        (["model.vocab_size=32"], "config error: model.vocab_size=32: expected at least the codebook size 64"),
        (["model.grid_size=8"], "config error: model.grid_size=8: expected 4 (16 tokens per image"),
        (["train.nonsense=1"], "config error: train.nonsense: unknown key"),
        ([f"data.path={tmp / 'images'}"], f"config error: data.path={tmp / 'images'}: expected a token store; "
                                          "this is a folder of images"),
        ([f"data.path={tmp / 'missing.zarr'}"], f"config error: data.path={tmp / 'missing.zarr'}: expected a token store"),
        ([f"data.path={tmp / 'a_file'}"], f"config error: data.path={tmp / 'a_file'}: expected a token store"),
        ([f"train.out_dir={tmp / 'a_file' / 'run'}"],
         f"config error: train.out_dir={tmp / 'a_file' / 'run'}: expected a folder, but {tmp / 'a_file'} is a file"),
        ([f"train.out_dir={ro / 'run'}"], f"config error: train.out_dir={ro / 'run'}: expected a writable folder"),
    ]


def test_every_bad_input_gives_one_line_and_exit_2(train_args, tmp_path, read_only, capsys):
    run = tmp_path / "run"
    for overrides, expected in cases(tmp_path, read_only):
        code = star_cli.main(train_args(run, *overrides))
        out, err = capsys.readouterr()
        lines = [l for l in err.splitlines() if l.strip()]
        assert (code, len(lines)) == (2, 1), (overrides, err)
        assert lines[0].startswith("star-scale: ") and expected in lines[0], (overrides, lines[0])
        assert not run.exists(), f"{overrides}: the run folder was created before the checks failed"


def test_the_command_itself_exits_2_with_one_line():
    done = cli("train", "optimizer.lr=-0.001", "train.out_dir=never-created")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["star-scale: config error: optimizer.lr=-0.001: expected a number > 0"]
    assert errors(done.stderr) and "Traceback" not in done.stderr
