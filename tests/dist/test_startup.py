"""Engine start-up over 2 gloo ranks with real DeepSpeed: every whole initial weight is drawn once per rank
for student and teacher together, zero.Init broadcasts nothing when the ranks drew the same values, and
broadcasts the unit whose values differ (another CPU's last bit) so the partitions still agree."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import launch_worker  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "startup_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch_worker(tmp_path_factory, WORKER, "startup")


@pytest.mark.parametrize("run", ["zero3", "zero2"])
def test_each_initial_weight_is_drawn_once_per_rank_for_student_and_teacher(ranks, run):
    for r in ranks:
        got = r[run]
        assert sorted(got["draws"]) == got["names"] and set(got["draws"].values()) == {1}
        assert got["student_equal"] and got["teacher_equal"]  # bit for bit the seeded model


def test_zero_init_does_not_broadcast_values_every_rank_drew(ranks):
    assert [r["zero3"]["zero_init_broadcasts"] for r in ranks] == [0, 0]


def test_a_unit_whose_values_differ_across_ranks_is_broadcast(ranks):
    # Rank 1's layers.0.attention.wqkv.weight is one ulp off: that block is broadcast from rank 0, for the
    # teacher and the student (2 x its 7 parameters), and both end as the seeded model (rank 0's values).
    for r in ranks:
        got = r["zero3_disagree"]
        assert got["zero_init_broadcasts"] == 2 * 7
        assert got["student_equal"] and got["teacher_equal"]
