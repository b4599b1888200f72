"""The training hot path never waits for the device: synchronizing calls per step are counted.

A read of a device tensor (``item``, ``tolist``, ``cpu``, ``float(t)``, ``bool(t)``, ...) or
``torch.cuda.synchronize`` blocks the host until the GPU catches up.  On CPU the same calls
are counted, so this test holds the GPU path to it.  The only tolerated ones are torch
AdamW's step counters, which live on the host by design (``_get_value``), and the GPT's
init_seed, drawn on the host once when the model is built.  The ranks' host agreements (a stop
signal, an asynchronous save written) are counted too: every ``train.stop_check_every`` steps,
each an all-reduce launched asynchronously and read one agreement later, never right after it.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from star_scale.models.build import build_model
from star_scale.objectives.module import build_training_module
from star_scale.train.local_engine import LocalEngine
from star_scale.train.loop import train
from star_scale.train.checkpoint import CheckpointDir
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
        self.read_ptrs: list[int] = []  # data_ptr of each tensor read, to tell which reduction was read
        self.paused = False

    @contextlib.contextmanager
    def patched(self):
        originals = {name: getattr(torch.Tensor, name) for name in READS}
        sync = torch.cuda.synchronize

        def wrap(name, fn):
            def counted(t, *args, **kwargs):
                if not self.paused and not _optimizer_counter_read() and not _seed_draw_at_construction():
                    self.calls.append(f"Tensor.{name}\n" + "".join(traceback.format_stack(limit=6)[:-1]))
                    self.read_ptrs.append(t.data_ptr())
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


@pytest.mark.parametrize("distributed", [False, True])
def test_the_loop_reads_metrics_once_per_log_interval(tiny_cfg, one_thread, distributed):
    counter = SyncCounter()

    class Counted(LocalEngine):
        def save_checkpoint(self, *args, **kwargs):  # not the hot path: saving reads every tensor
            counter.paused = True
            super().save_checkpoint(*args, **kwargs)
            counter.paused = False

    cfg = tiny_cfg("objective.name=star", "data.global_batch=4", "train.steps=10", "train.log_every=5",
                   "train.ckpt_every=100", "train.stop_check_every=5")
    with _one_rank_group() if distributed else contextlib.nullcontext(), counter.patched():
        summary = train(cfg, engine_factory=Counted)
    assert summary["step"] == 10
    lines = (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10  # every step is still recorded
    # One metrics read at step 5 and one at step 10; distributed, also the stop agreement launched at 5, read at 10.
    assert len(counter.calls) == (3 if distributed else 2), "\n".join(counter.calls)


@contextlib.contextmanager
def _one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Reductions:
    """Every ``dist.all_reduce``: (step launched, asynchronous?), and which step each tensor was launched at."""

    def __init__(self, monkeypatch):
        self.step, self.calls, self.launched = 0, [], {}
        real = dist.all_reduce

        def counted(t, *args, async_op=False, **kwargs):
            self.calls.append((self.step, async_op))
            self.launched[t.data_ptr()] = self.step
            return real(t, *args, async_op=async_op, **kwargs)

        monkeypatch.setattr(dist, "all_reduce", counted)


def _steps(steps, reductions, counter, each):
    """Run ``each(step)`` for steps 1..; the steps at which the counter saw a read. Stops when ``each`` says so."""
    read_at = []
    for step in range(1, steps + 1):
        reductions.step = step
        before = len(counter.calls)
        done = each(step)
        read_at += [step] * (len(counter.calls) - before)
        if done:
            break
    return read_at


def test_distributed_stop_flag_is_agreed_without_waiting_for_the_device(monkeypatch):
    with _one_rank_group():
        stop, reductions, counter = StopSignals(), Reductions(monkeypatch), SyncCounter()
        flags = []

        def check(step):
            if step == 7:
                stop._handle(signal.SIGTERM, None)
            flags.append(stop.should_stop(torch.device("cpu"), step, every=5))
            return flags[-1]

        with counter.patched():
            read_at = _steps(40, reductions, counter, check)
        stop.restore()
    assert reductions.calls == [(5, True), (10, True)]  # asynchronous, at checks only; none once stopping
    assert read_at == [10, 15]  # one read per check
    assert [reductions.launched[p] for p in counter.read_ptrs] == [5, 10]  # each the previous check's reduction
    assert flags == [False] * 14 + [True] and stop.signal_name == "SIGTERM"  # signalled at 7: agreed at 10, read at 15


def test_a_pending_async_save_is_agreed_every_n_steps_not_every_step(monkeypatch, tmp_path):
    """While a save is written, poll() runs every step: one asynchronous all-reduce every
    ``stop_check_every`` polls, read one agreement later, and no object gather.  (The commit itself,
    collective and once per checkpoint, is the real one in tests/dist; here it only records its step.)"""
    from star_scale.parallel import checkpoint as dist_ckpt

    written = threading.Event()
    job = dist_ckpt._Save(CheckpointDir(tmp_path), 3, None, {}, 0)
    job.thread = threading.Thread(target=written.wait, daemon=True)
    job.thread.start()
    engine = SimpleNamespace(pending_save=job, device=torch.device("cpu"),
                             cfg=SimpleNamespace(train=SimpleNamespace(stop_check_every=5)))
    with _one_rank_group():
        reductions, counter, commits = Reductions(monkeypatch), SyncCounter(), []
        monkeypatch.setattr(dist_ckpt, "_commit", lambda engine, job: commits.append(reductions.step))
        monkeypatch.setattr(dist, "all_gather_object", lambda *a, **k: commits.append("all_gather_object"))

        def step(n):
            if n == 12:  # the writer thread finishes between the agreements at 10 and 15
                written.set()
                job.thread.join()
            dist_ckpt.poll(engine)
            return engine.pending_save is None

        with counter.patched():
            read_at = _steps(40, reductions, counter, step)
    assert reductions.calls == [(5, True), (10, True), (15, True)]
    assert read_at == [10, 15, 20]
    assert [reductions.launched[p] for p in counter.read_ptrs] == [5, 10, 15]
    assert commits == [20]  # agreed "all written" at 15, read and committed at 20
