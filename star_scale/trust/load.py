"""Reading torch files without running code from them.

A full unpickle (torch.load without ``weights_only``) executes whatever a pickle asks for: a file
from a model hub, or one replaced in a run folder that other accounts can
write, would run its code with the user's rights.  Every torch file
star-scale reads goes through ``load_torch``: ``weights_only=True`` with only
the classes named by the caller allowed (``argparse.Namespace`` for LlamaGen's
checkpoints, DeepSpeed's loss scaler for its optimizer files).  A file that
needs anything else is refused with ``RefusedFile`` naming the file and the
globals it would run; only the user's explicit ``--trust-pickle`` loads it
unpickled in full.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
from typing import Iterable

import torch

from star_scale.trust import RefusedFile

log = logging.getLogger(__name__)


def _name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def unsafe_globals(f, allowed: Iterable = ()) -> list[str]:
    """The globals a torch file's pickle refers to beyond weights and ``allowed`` (read, never executed)."""
    if isinstance(f, io.BytesIO):
        f.seek(0)
    names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    if isinstance(f, io.BytesIO):
        f.seek(0)
    ok = {_name(a) for a in allowed}
    return sorted(set(names) - ok)


def _refusal(f, source: str, allowed, error: Exception) -> RefusedFile:
    try:
        names = unsafe_globals(f, allowed)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: the unpickler's message names the first one
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(error))[:1]
    return _code(source, names) if names else _unreadable(source, error)


def _code(source: str, names: list[str]) -> RefusedFile:
    return RefusedFile(source, f"refusing to unpickle {', '.join(names)}: loading it would run code from the file "
                               "(pass --trust-pickle only if you trust its source)", names)


def refuse_code(path: str | os.PathLike, allowed: Iterable = ()) -> None:
    """Raise ``RefusedFile`` if ``path``'s pickle names globals beyond weights and ``allowed``; loads nothing."""
    try:
        names = unsafe_globals(path, allowed)
    except (ValueError, RuntimeError, OSError) as e:  # not torch's zip format, which is all star-scale writes
        raise _unreadable(str(path), e) from None
    if names:
        raise _code(str(path), names)


def _unreadable(source: str, error: Exception) -> RefusedFile:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return RefusedFile(source, f"cannot read as a torch checkpoint ({type(error).__name__}: "
                               f"{(lines[-1] if lines else '')[:200]})")


def load_torch(f: str | os.PathLike | io.BytesIO, *, allowed: Iterable = (), trust_pickle: bool = False,
               source: str | None = None, **kwargs):
    """``torch.load`` on CPU with ``weights_only=True`` plus ``allowed`` classes; ``RefusedFile`` otherwise.

    ``trust_pickle`` (the user's ``--trust-pickle``, never a choice made here)
    unpickles a file that holds more than that in full, after a warning naming
    what it runs.
    """
    source = source or str(f)
    allowed = list(allowed)
    kwargs.setdefault("map_location", "cpu")
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(f, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        refusal = _refusal(f, source, allowed, e)
        if not trust_pickle:
            raise refusal from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, AttributeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _unreadable(source, e) from None
    log.warning("%s: --trust-pickle: unpickling in full, which runs %s", source, ", ".join(refusal.names) or "?")
    if isinstance(f, io.BytesIO):
        f.seek(0)
    return torch.load(f, weights_only=False, **kwargs)
