"""CUDA_DEVICE_MAX_CONNECTIONS=1 under tensor parallelism, set by the real start-up path (init_layout) on
every rank before DeepSpeed and CUDA start, unless the user set it; TP = 1 keeps CUDA's default."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_torchrun  # noqa: E402

# Each rank writes its own file: two ranks printing to one shared stdout can interleave within a line.
CODE = """
import json, os, sys
from pathlib import Path
from star_scale.parallel.layout import init_layout, shutdown
L = init_layout(int(sys.argv[1]), "cpu")
Path(sys.argv[2], f"rank{L.rank}.json").write_text(json.dumps(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")))
shutdown()
"""


def _seen(tmp_path, tp: int) -> list:
    out = tmp_path / f"tp{tp}"
    out.mkdir()
    run_torchrun(2, "--no-python", sys.executable, "-c", CODE, str(tp), str(out), log=out / "launch.log")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_tp2_start_up_sets_one_device_queue_on_every_rank_and_tp1_leaves_it(tmp_path):
    assert _seen(tmp_path, 2) == ["1", "1"]
    assert _seen(tmp_path, 1) == [None, None]
