"""Shared by the sweep modules: the error type, compact numbers, atomic file writes."""
from __future__ import annotations

from pathlib import Path

from star_scale import atomic
from star_scale.config import ConfigError


class SweepError(ConfigError):
    pass


def short(x: float) -> str:
    """Compact number for names and tables: 2048 -> 2048, 20480 -> 2.05e4, 1e9 -> 1e9."""
    if x < 1e4 and float(x).is_integer():
        return str(int(x))
    mant, exp = f"{x:.3g}".split("e") if "e" in f"{x:.3g}" else (f"{x:.3g}", "0")
    return f"{mant}e{int(exp)}" if int(exp) else mant


def _atomic_write(path: Path, data: str | bytes) -> None:
    atomic.write_bytes(path, data.encode() if isinstance(data, str) else data)
