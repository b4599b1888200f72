"""Stop cleanly on Slurm's signals: checkpoint, and requeue when the time limit nears.

- SIGUSR1 (``--signal=USR1@N``): the time limit is N seconds away; save,
  then ``scontrol requeue`` this job so it continues from the checkpoint. Under
  star-scale's own sbatch script (``STAR_SCALE_REQUEUE_BY=batch``) the script
  requeues instead, after the save or when the save runs out of time.
- SIGTERM (``scontrol requeue``, preemption, ``scancel``): save and exit; Slurm
  requeues or ends the job itself.
All ranks must stop at the same step, so the flag is agreed on collectively every
``train.stop_check_every`` steps without a device sync: the all-reduce launched at one check is
read at the next (``agreement.Agreement``), so a signal stops every rank within two intervals.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import torch
import torch.distributed as dist

from star_scale.train.agreement import Agreement

log = logging.getLogger(__name__)


class StopSignals:
    def __init__(self):
        self.signal_name = None
        self._agreement = None  # launched at the last check, read at the next
        self._previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test harness): no handlers
                pass

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: will checkpoint and stop at the next step all ranks agree on", self.signal_name)

    def should_stop(self, device: torch.device, step: int = 0, every: int = 1) -> bool:
        """True on every rank, at the same step, if any rank was signalled.

        Distributed, at steps divisible by ``every`` (train.stop_check_every) each rank reads the
        all-reduce launched at the previous such step and, unless that says stop, launches the next.
        """
        flag = self.signal_name is not None
        if dist.is_available() and dist.is_initialized():
            if step % every:
                return False
            agreed = self._agreement.read() if self._agreement is not None else 0
            self._agreement = None
            if not agreed:  # the same on every rank: all launch, or none
                self._agreement = Agreement(2 if self.signal_name == "SIGUSR1" else int(flag), device)
            if agreed and self.signal_name is None:
                self.signal_name = "SIGUSR1" if agreed == 2 else "SIGTERM"
            flag = bool(agreed)
        if flag:
            _fault_slow_save()
        return flag

    def requeue_if_asked(self, is_main: bool) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("STAR_SCALE_REQUEUE_BY") == "batch":
            return
        if self.signal_name != "SIGUSR1" or not is_main or not job:
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode:
            log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        else:
            log.warning("requeued Slurm job %s; it resumes from the checkpoint just written", job)

    def restore(self) -> None:
        self._agreement = None  # every rank launched it: it completes without being read
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _fault_slow_save() -> None:
    """Fault injection for tests: STAR_SCALE_FAULT_SLOW_SAVE=SECONDS makes the signal-triggered save that slow."""
    delay = float(os.environ.get("STAR_SCALE_FAULT_SLOW_SAVE", 0) or 0)
    if delay > 0:
        log.warning("fault injection: the signal-triggered checkpoint takes %.0f s longer", delay)
        time.sleep(delay)
