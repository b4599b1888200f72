"""Engine start-up on 2 gloo ranks: how often each initial weight is drawn, how many broadcasts zero.Init
issues, and whether the partitioned student and teacher are the seeded model.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/startup_worker.py OUT_DIR

Writes startup.rankR.json for tests/dist/test_startup.py.
"""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import deepspeed.comm
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from star_scale.models import gpt as gpt_module  # noqa: E402
from star_scale.parallel import whole_state  # noqa: E402
from star_scale.parallel.engine import DeepSpeedEngine  # noqa: E402
from star_scale.parallel.layout import shutdown  # noqa: E402

PERTURBED = "layers.0.attention.wqkv.weight"


def start(*extra: str, perturb_rank: int | None = None) -> dict:
    """Build one star engine, counting draws per parameter name and zero.Init's broadcasts."""
    draws, broadcasts = collections.Counter(), collections.Counter()
    draw, broadcast = gpt_module.initial_value, deepspeed.comm.broadcast

    def counted_draw(seed, name, shape, std):
        draws[name] += 1
        value = draw(seed, name, shape, std)
        if name == PERTURBED and dist.get_rank() == perturb_rank:  # another CPU's last bit
            value.view(-1)[0] = torch.nextafter(value.view(-1)[0], torch.tensor(1.0))
        return value

    def counted_broadcast(*args, **kwargs):
        broadcasts[sys._getframe(1).f_code.co_name] += 1
        return broadcast(*args, **kwargs)

    gpt_module.initial_value, deepspeed.comm.broadcast = counted_draw, counted_broadcast
    try:
        cfg = common.config("star", *extra, world=2)
        engine = DeepSpeedEngine(common.build(cfg), cfg)
    finally:
        gpt_module.initial_value, deepspeed.comm.broadcast = draw, broadcast
    seeded = dict(common.build(cfg, meta=False).student.named_parameters())
    student = {k[len("student."):]: v for k, v in whole_state.consolidate_student(engine).items()}
    teacher = engine.teacher.full_state()
    return {"draws": dict(draws), "zero_init_broadcasts": broadcasts["_zero_init_param"],
            "names": sorted(seeded),
            "student_equal": all(torch.equal(student[n], seeded[n]) for n in seeded),
            "teacher_equal": all(torch.equal(teacher[n], seeded[n]) for n in seeded)}


def main() -> None:
    out_dir = Path(sys.argv[1])
    results = {"zero3": start(), "zero2": start("parallel.zero_stage=2"),
               "zero3_disagree": start(perturb_rank=1)}
    (out_dir / f"startup.rank{dist.get_rank()}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
