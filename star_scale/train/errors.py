"""Errors that end a training job with one line instead of a traceback (the CLI prints them)."""
from __future__ import annotations


class RunError(RuntimeError):
    exit_code = 1
    quiet = False  # True on the ranks of a distributed job whose rank 0 prints the line


class RunFolderError(RunError):
    """The run folder cannot be used as asked: held by another job, unwritable, or its history would be lost."""
    exit_code = 2


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is still the latest.

    In a distributed job every rank raises it; only rank 0's is printed (``quiet`` elsewhere)."""
    exit_code = 1

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def checkpoint_write_error(final, err: BaseException, needed: int) -> CheckpointWriteError:
    """One line for a failed save: the path, the reason, the bytes needed and the bytes free."""
    import shutil

    free = shutil.disk_usage(final.parent).free
    if isinstance(err, OSError) and err.strerror:
        reason = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if free < needed:
        reason = f"disk full; {reason}"
    return CheckpointWriteError(f"checkpoint {final} could not be written ({reason}); it needs about {needed} bytes, "
                                f"{free} bytes are free there. The previous checkpoint is still the latest: free "
                                "space and rerun the same command to resume")


WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EIO", "EACCES"}


def is_write_error(err: BaseException) -> bool:
    import errno

    return isinstance(err, OSError) and errno.errorcode.get(err.errno) in WRITE_ERRNOS


def run_write_error(err: OSError) -> RunError:
    """One line for any other failed write of the job (metrics, config): the file, the reason, the bytes free."""
    import shutil
    from pathlib import Path

    where = Path(err.filename or ".")
    while not where.exists() and where != where.parent:
        where = where.parent
    return RunError(f"{err.filename}: {err.strerror}; {shutil.disk_usage(where).free} bytes are free there. "
                    "Checkpoints already written are whole: fix the cause and rerun the same command to resume")
