"""Errors that end a training job with one line instead of a traceback (the CLI prints them)."""
from __future__ import annotations


class RunError(RuntimeError):
    exit_code = 1


class RunFolderError(RunError):
    """The run folder cannot be used as asked: held by another job, unwritable, or its history would be lost."""
    exit_code = 2


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is still the latest."""
    exit_code = 1


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
