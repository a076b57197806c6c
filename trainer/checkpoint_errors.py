"""The errors a checkpoint save or load raises, and how every process comes to raise the same one.

``CheckpointError`` (a ``ValueError``) is the one the inference loader raises for a damaged file:
one class for every checkpoint that cannot be loaded as it is. The subclasses keep the builtin
types older code catches: a missing file is also a ``FileNotFoundError``, keys that do not match
the model also a ``RuntimeError``. A save that cannot be written (no space, a read-only folder)
is a ``CheckpointWriteError``, an ``OSError`` with the ``errno`` of the cause.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from trainer.inference.checkpoint_shards import CheckpointError

__all__ = ["CheckpointError", "CheckpointFileNotFoundError", "CheckpointKeysError", "CheckpointWriteError",
           "agree_on_error", "error_report", "raise_agreed"]


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """A file the checkpoint should hold is not there; the message names it."""


class CheckpointKeysError(CheckpointError, RuntimeError):
    """A saved model's keys or shapes do not match the prepared model's; the message lists them."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); the previous one is untouched."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


# Rebuilt on processes that did not fail themselves, so that every process raises the same type.
_KINDS: dict[str, Callable[[str], BaseException]] = {
    cls.__name__: cls for cls in (CheckpointError, CheckpointFileNotFoundError, CheckpointKeysError,
                                  CheckpointWriteError, FileNotFoundError, ValueError, TypeError, RuntimeError, OSError)
}


def error_report(error: BaseException | None) -> tuple[str, str] | None:
    """What another process needs to raise the same error: its type's name and its message."""
    return None if error is None else (type(error).__name__, str(error))


def raise_agreed(error: BaseException | None, reports: list[tuple[str, str] | None]) -> None:
    """Raise this process's own ``error``, else the first error another process reported; return if none."""
    if error is not None:
        raise error
    failed = [(index, report) for index, report in enumerate(reports) if report is not None]
    if failed:
        index, (kind, message) = failed[0]
        build = _KINDS.get(kind)
        raise build(message) if build is not None else RuntimeError(f"Process {index} failed: {kind}: {message}")


def agree_on_error(error: BaseException | None, gather: Callable[[Any], list[Any]]) -> None:
    """Raise on every process when one of them failed (its own error where it has one); else return.

    ``gather`` is the strategy's ``all_gather_object``; on one process it returns ``[value]``.
    Calling it in place of a barrier keeps the processes from waiting for one that already gave up.
    """
    raise_agreed(error, gather(error_report(error)))


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` (an ``OSError``, or safetensors' error quoting one) says the disk or quota is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def not_writable(error: BaseException) -> bool:
    """Whether ``error`` says the folder cannot be written (read-only file system, no permission)."""
    if isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return True
    text = str(error)
    return "Read-only file system" in text or "Permission denied" in text
