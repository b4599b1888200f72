"""Progress for terminals and for log files.

A terminal gets a tqdm bar.  When stderr is not a terminal (Slurm job logs,
CI, ``nohup``) a bar would write a carriage-return frame per update into the
file, so progress becomes plain lines instead: one every ``every`` units or
``seconds`` seconds, whichever comes first, and one at the end.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional

# Seconds between progress lines in log files (STAR_SCALE_PROGRESS_SECONDS overrides).
DEFAULT_SECONDS = 30.0


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class LineProgress:
    """tqdm's update/set_postfix/close surface, writing whole lines."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, every: Optional[int] = None, seconds: Optional[float] = None,
                 disable: bool = False, stream=None):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self._last_n = self._start_n = initial
        self.every = every
        self.seconds = float(os.environ.get("STAR_SCALE_PROGRESS_SECONDS", DEFAULT_SECONDS)) if seconds is None else seconds
        self.stream = stream
        self.postfix = ""
        self._t0 = self._last_t = time.monotonic()
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **kw) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        by_count = self.every and self.n // self.every > self._last_n // self.every
        if by_count or now - self._last_t >= self.seconds:
            self._emit(now)

    def close(self) -> None:
        if not self._closed and self.n != self._last_n:
            self._emit(time.monotonic())
        self._closed = True

    def line(self, now: float) -> str:
        rate = (self.n - self._start_n) / max(now - self._t0, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {done} {self.unit}"]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {format_seconds((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return " ".join(parts)

    def _emit(self, now: float) -> None:
        self._last_n, self._last_t = self.n, now
        if not self.disable:
            print(self.line(now), file=self.stream or sys.stderr, flush=True)


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "", unit: str = "it",
             initial: int = 0, every: Optional[int] = None, seconds: Optional[float] = None, disable: bool = False,
             leave: bool = True):
    """A tqdm bar on a terminal, else a LineProgress (``every`` units or ``seconds`` seconds per line)."""
    if is_terminal():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave,
                    dynamic_ncols=True, file=sys.stderr)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, every=every,
                        seconds=seconds, disable=disable)
