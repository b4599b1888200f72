"""Single-process <-> consolidated state round trip (no processes): the bridge between the engines."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from star_scale.parallel.consolidated import from_local, optimizer_order, to_local  # noqa: E402
from star_scale.train.local_engine import LocalEngine  # noqa: E402


def test_local_state_through_consolidated_continues_exactly():
    cfg = common.config("star")
    batches = common.batches(4, 2)
    a = LocalEngine(common.build(cfg), cfg)
    for b in batches[:2]:
        a.train_step(*b)
    state = from_local(a.state_dict(), a.module)
    assert state["optimizer_step"] == 2 and set(state["moments"]) == set(optimizer_order(a.module))
    assert state["teacher"] and not any(k.startswith("teacher.") for k in state["module"])
    b = LocalEngine(common.build(cfg), cfg)
    to_local(state, b.module, b.optimizer)
    b.step = state["optimizer_step"]  # as load_checkpoint does: ST-AR's draws follow the step
    expected = [a.train_step(*x)["loss"] for x in batches[2:]]
    assert [b.train_step(*x)["loss"] for x in batches[2:]] == expected
