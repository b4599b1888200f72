"""ZeRO-3 on 2 ranks vs 1 process (same global batches, fixed seed): ar and star losses, sharded EMA teacher."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from conftest import run_torchrun  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "worker.py")


# Relative loss tolerance over 20 steps. The gradients agree to float rounding, but the 2 ranks sum
# them in another order, and Adam scales near-zero gradients up to +-lr: in the AR run (no clipping,
# grad norm 0.7-0.9) that reaches 2.2e-5 by step 20, identically for a meta-built and a whole-built
# module; the ST-AR run stays within 1e-5.
RTOL = {"ar": 1e-4, "star": 1e-5}


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2")
    run_torchrun(2, WORKER, "dp2", str(out), log=out / "log.txt")
    ranks = [json.loads((out / f"dp2.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["ar"]["losses"] == ranks[1]["ar"]["losses"], "ranks report the global batch's loss"
    return ranks[0]


@pytest.mark.parametrize("objective", ["ar", "star"])
def test_zero3_two_ranks_match_one_process(dp2, objective):
    reference = common.reference_losses(objective)
    got = dp2[objective]["losses"]
    assert len(got) == common.STEPS == 20
    np.testing.assert_allclose(got, reference, rtol=RTOL[objective], atol=0)
    assert reference[0] != reference[-1]  # the run did train


@pytest.mark.parametrize("run,objective", [("ar_recompute", "ar"), ("star_zero2", "star"),
                                           ("star_whole_build", "star")])
def test_recompute_zero2_and_a_whole_built_module_match_one_process(dp2, run, objective):
    np.testing.assert_allclose(dp2[run]["losses"], common.reference_losses(objective), rtol=RTOL[objective], atol=0)


def test_sharded_teacher_is_the_ema_of_the_gathered_student(dp2):
    star = dp2["star"]
    assert star["teacher_moved"] > 1e-3  # decay 0.9 over 20 steps: far from its start
    assert star["teacher_max_diff"] <= 1e-6


def test_accumulation_and_ranks_together_match_one_process(dp2):
    """2 ranks x 2 micro-batches see the negatives of the whole global batch, as one process with none."""
    np.testing.assert_allclose(dp2["star_accum"]["losses"], common.reference_losses("star"), rtol=1e-5, atol=0)


def test_zero2_bf16_teacher_is_the_ema_of_the_fp32_masters(dp2):
    """At ZeRO-2 in bf16 the replicated teacher follows the optimizer's fp32 masters exactly (the bf16
    weights would differ by their rounding, ~1e-3 of a weight, every step)."""
    run = dp2["star_zero2_bf16"]
    assert run["teacher_moved"] > 1e-3
    assert run["teacher_max_diff"] <= 1e-6
