"""The training hot path never waits for the device: synchronizing calls per step are counted.

A read of a device tensor (``item``, ``tolist``, ``cpu``, ``float(t)``, ``bool(t)``, ...) or
``torch.cuda.synchronize`` blocks the host until the GPU catches up.  On CPU the same calls
are counted, so this test holds the GPU path to it.  The only tolerated ones are torch
AdamW's step counters, which live on the host by design (``_get_value``), and the GPT's
init_seed, drawn on the host once when the model is built.
"""
from __future__ import annotations

import contextlib
import sys
import traceback

import torch
import torch.distributed as dist

from star_scale.models.build import build_model
from star_scale.objectives.module import build_training_module
from star_scale.train.local_engine import LocalEngine
from star_scale.train.loop import train
from star_scale.train.preemption import StopSignals

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _optimizer_counter_read() -> bool:
    """Called from torch.optim's ``_get_value`` (AdamW's host-side step counter)?"""
    caller = sys._getframe(2).f_code
    return caller.co_name == "_get_value" and caller.co_filename.endswith(("optim/optimizer.py", "optim\\optimizer.py"))


def _seed_draw_at_construction() -> bool:
    """GPT.__init__ reading its init_seed, one host number drawn before training starts (not a step)."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "__init__" and code.co_filename.endswith(("models/gpt.py", "models\\gpt.py")):
            return True
        frame = frame.f_back
    return False


class SyncCounter:
    def __init__(self):
        self.calls: list[str] = []
        self.paused = False

    @contextlib.contextmanager
    def patched(self):
        originals = {name: getattr(torch.Tensor, name) for name in READS}
        sync = torch.cuda.synchronize

        def wrap(name, fn):
            def counted(t, *args, **kwargs):
                if not self.paused and not _optimizer_counter_read() and not _seed_draw_at_construction():
                    self.calls.append(f"Tensor.{name}\n" + "".join(traceback.format_stack(limit=6)[:-1]))
                return fn(t, *args, **kwargs)
            return counted

        def counted_sync(*args, **kwargs):
            self.calls.append("torch.cuda.synchronize")
            return sync(*args, **kwargs)

        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        torch.cuda.synchronize = counted_sync
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
            torch.cuda.synchronize = sync


def _engine(tiny_cfg, *overrides):
    cfg = tiny_cfg(*overrides)
    torch.manual_seed(0)
    return LocalEngine(build_training_module(cfg, build_model(cfg)), cfg)


def test_a_star_step_with_accumulation_reads_nothing_from_the_device(tiny_cfg, one_thread):
    engine = _engine(tiny_cfg, "objective.name=star", "data.global_batch=4", "data.micro_batch=2")
    batch = torch.randint(0, 64, (4, 2, 16)), torch.randint(0, 4, (4,))
    engine.train_step_lazy(*batch)  # creates the optimizer state
    with SyncCounter().patched() as counter:
        for _ in range(2):
            metrics = engine.train_step_lazy(*batch)
    assert counter.calls == [], counter.calls[0]
    assert {"loss", "loss_ar", "loss_mim", "loss_step", "loss_view", "grad_norm"} <= set(metrics)
    assert all(isinstance(v, torch.Tensor) for k, v in metrics.items() if k != "lr")


def test_the_loop_reads_metrics_once_per_log_interval(tiny_cfg, one_thread):
    counter = SyncCounter()

    class Counted(LocalEngine):
        def save_checkpoint(self, *args, **kwargs):  # not the hot path: saving reads every tensor
            counter.paused = True
            super().save_checkpoint(*args, **kwargs)
            counter.paused = False

    cfg = tiny_cfg("objective.name=star", "data.global_batch=4", "train.steps=10", "train.log_every=5",
                   "train.ckpt_every=100")
    with counter.patched():
        summary = train(cfg, engine_factory=Counted)
    assert summary["step"] == 10
    lines = (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10  # every step is still recorded
    assert len(counter.calls) == 2, "\n".join(counter.calls)  # one read at step 5, one at step 10


def test_distributed_stop_flag_is_agreed_every_n_steps():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        stop = StopSignals()
        with SyncCounter().patched() as counter:
            flags = [stop.should_stop(torch.device("cpu"), step, every=5) for step in range(1, 11)]
        stop.restore()
        assert flags == [False] * 10
        assert len(counter.calls) == 2  # steps 5 and 10 only
    finally:
        dist.destroy_process_group()
