"""Host-side agreements over 2 gloo ranks: one masked-attention backend (rank 0's, timed at the training
shape), a stop signal on one rank stopping both at the same step, an asynchronous save committed by
the polling agreement, and a failed write on one rank ending both at the same poll."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import launch_worker  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "agreement_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch_worker(tmp_path_factory, WORKER, "agreements")


def test_every_rank_uses_rank_0s_masked_backend_timed_at_the_training_shape(ranks):
    r0, r1 = ranks[0]["masked"], ranks[1]["masked"]
    assert r0["choice"] == r0["used"] == "sdpa-math"  # rank 0's timer prefers sdpa-math
    assert r1["choice"] == r1["used"] == "sdpa-math"  # rank 1's would have preferred flex
    assert r0["timed"] == [r0["expected_shape"]] * 3  # every candidate at (2 images x 2 views, heads, T, d)
    assert r1["timed"] == []  # only rank 0 times


def test_a_signal_on_one_rank_stops_both_at_the_same_step(ranks):
    # SIGTERM on rank 1 at step 7: launched into the agreement at step 10, read at step 15.
    assert [r["stop"] for r in ranks] == [{"stopped_at": 15, "signal": "SIGTERM"}] * 2


def test_async_saves_commit_or_fail_together_at_the_agreed_poll(ranks):
    for r in ranks:
        s = r["saves"]
        assert s["committed_at_poll"] == 4  # agreed "all written" at poll 2 (stop_check_every=2), read at 4
        assert s["failed_at_poll"] == 4 and "rank 1 could not write (injected)" in s["error"]
        assert s["steps"] == [1] and s["leftovers"] == []  # the failed one's temporary folder is gone
