"""CUDA_DEVICE_MAX_CONNECTIONS=1 under tensor parallelism, set by the real start-up path (init_layout) on
every rank before DeepSpeed and CUDA start, unless the user set it; TP = 1 keeps CUDA's default."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_torchrun  # noqa: E402

CODE = """
import json, os, sys
from star_scale.parallel.layout import init_layout, shutdown
L = init_layout(int(sys.argv[1]), "cpu")
print("QUEUES", json.dumps([L.rank, os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")]), flush=True)
shutdown()
"""


def _seen(tmp_path, tp: int) -> list:
    log = tmp_path / f"tp{tp}.log"
    run_torchrun(2, "--no-python", sys.executable, "-c", CODE, str(tp), log=log)
    return sorted(json.loads(l.split("QUEUES", 1)[1]) for l in log.read_text().splitlines() if "QUEUES" in l)


def test_tp2_start_up_sets_one_device_queue_on_every_rank_and_tp1_leaves_it(tmp_path):
    assert _seen(tmp_path, 2) == [[0, "1"], [1, "1"]]
    assert _seen(tmp_path, 1) == [[0, None], [1, None]]
