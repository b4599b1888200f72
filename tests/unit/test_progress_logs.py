"""Progress in log files: whole lines, never a carriage-return bar per step."""
import subprocess
import sys
import time
from pathlib import Path

from star_scale.console.progress import LineProgress

ROOT = Path(__file__).resolve().parents[2]


def test_training_command_logs_lines_not_bars_when_stderr_is_a_file(token_npz, tmp_path):
    log_file = tmp_path / "job.log"
    cmd = [sys.executable, "-m", "star_scale.cli", "train", "model.preset=tiny", "model.vocab_size=64",
           "model.num_classes=4", "model.grid_size=4", f"data.path={token_npz}", "data.global_batch=16",
           "train.steps=12", "train.log_every=4", "train.ckpt_every=12", f"train.out_dir={tmp_path / 'run'}",
           "tracking.enabled=false"]
    with open(log_file, "w") as err:
        subprocess.run(cmd, stderr=err, stdout=subprocess.DEVNULL, check=True, cwd=ROOT, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    text = log_file.read_text()
    assert "\r" not in text
    steps = [line for line in text.splitlines() if " | loss " in line]
    assert [line.split("step ")[1].split(" |")[0] for line in steps] == ["4", "8", "12"], text


def test_line_progress_writes_every_n_and_every_seconds(tmp_path):
    out = tmp_path / "log.txt"
    with open(out, "w") as f:
        bar = LineProgress(total=10, desc="work", unit="img", every=4, seconds=1e9, stream=f)
        for _ in range(10):
            bar.update(1)
        bar.close()
        timed = LineProgress(total=3, desc="slow", seconds=0.05, stream=f)
        timed.update(1)
        time.sleep(0.06)
        timed.update(1)
        timed.update(1)
        timed.close()
    lines = out.read_text().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["4/10", "8/10", "10/10", "2/3", "3/3"], lines
    assert lines[0].startswith("work: 4/10 img (40%)")
