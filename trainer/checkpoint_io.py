"""Checkpoint directories written atomically (a scratch folder swapped into place), and what a crash leaves.

A save writes ``.<name>.tmp-<pid>-XXXX`` beside the target and then puts it in place:

- where the system can swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``, on local
  file systems), the scratch folder and the target trade places, so a crash at any point leaves a
  complete checkpoint under the target's own name;
- elsewhere the target is first moved aside to ``.<name>.old-<pid>``, then the scratch folder is
  renamed in. A crash between the two renames leaves the previous checkpoint complete under the
  ``.old`` name; ``load_state`` finds it there (``find_intact_copy``).

Folders that a crashed save left behind are removed by the next save of the same checkpoint,
once their writer process is gone. The files inside follow ``strategies.state_format``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from trainer.checkpoint_errors import CheckpointWriteError, not_writable, out_of_space
from trainer.strategies.state_format import (  # noqa: F401  (the state format, re-exported for trainer's modules)
    join_state,
    load_state_files,
    read_json,
    save_state_files,
    split_state,
    write_json,
    write_split_state,
)

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_LEFTOVER = r"\.{name}\.(tmp|old)-(\d+)(?:-.*)?"


def new_scratch_directory(target: Path) -> Path:
    """An empty sibling of ``target`` to write a checkpoint into before it replaces ``target``.

    Its name records this process's id, so that a later save can tell a crashed writer's folder
    from one still being written.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as error:
        raise write_error(error, target) from error


def write_error(error: BaseException, target: Path, needed: int | None = None,
                free_before: int | None = None) -> CheckpointWriteError:
    """The error to raise for a save of ``target`` that failed writing (full, read-only, other).

    ``free_before`` (the bytes free when the save began) marks a disk that filled up during the
    save rather than one found too small beforehand.
    """
    folder = Path(target).parent
    if out_of_space(error):
        wants = f"about {needed:,} bytes" if needed is not None else "more space"
        if free_before is None:
            free = shutil.disk_usage(folder).free if folder.is_dir() else 0
            found = f"it needs {wants}, and {free:,} bytes are free in {folder}"
        else:
            found = (f"the disk filled up while it was written (it needs {wants}, plus any files before_commit adds; "
                     f"{free_before:,} bytes were free in {folder} when the save began)")
        return CheckpointWriteError(f"No space left to save the checkpoint {target}: {found}. Free some space (or save "
                                    "elsewhere); the previous checkpoint there is untouched.", errno.ENOSPC)
    if not_writable(error):
        return CheckpointWriteError(
            f"Cannot save the checkpoint {target}: the folder {folder} is not writable ({error}). Make it writable "
            "or save elsewhere; the previous checkpoint there is untouched.", getattr(error, "errno", None))
    return CheckpointWriteError(f"Saving the checkpoint {target} failed while writing: {error}. The previous "
                                "checkpoint there is untouched.", getattr(error, "errno", None))


def check_free_space(target: Path, needed: int) -> int:
    """The bytes free beside ``target``; raise before anything is written when fewer than ``needed``."""
    free = shutil.disk_usage(Path(target).parent).free
    if free < needed:
        raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), target, needed)
    return free


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    """The C library's ``renameat2``, or None (not Linux, or a C library without it)."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step; False where the system or the file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def sync_path(path: Path) -> None:
    """``fsync`` a file or a folder (its entries): its data reaches the disk, not only the page cache."""
    folder = path.is_dir()
    if folder and os.name == "nt":  # a folder cannot be opened there; renames are durable by other means
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some file systems cannot sync a folder's entries; a file's data must reach the disk
            raise
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """``fsync`` every file under ``root`` and every folder, ``root`` last."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            sync_path(Path(folder) / name)
        sync_path(Path(folder))


def commit_directory(scratch: Path, target: Path) -> None:
    """Put the finished ``scratch`` in place of ``target``, then remove what ``target`` held.

    A crash at any point leaves a complete checkpoint: under ``target`` where the two folders can
    be swapped atomically, else (for an instant) under ``.<name>.old-<pid>`` next to it. The files
    are synced to the disk before the swap, and the parent folder after it, so that a power loss
    cannot leave a checkpoint in place whose files the disk never received.
    """
    scratch, target = Path(scratch), Path(target)
    sync_tree(scratch)
    try:
        _swap_in(scratch, target)
    finally:
        sync_path(target.parent)


def _swap_in(scratch: Path, target: Path) -> None:
    if target.exists():
        if _exchange(scratch, target):
            shutil.rmtree(scratch, ignore_errors=True)  # now the previous checkpoint
            return
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier process with this id
        os.replace(target, old)
        try:
            os.replace(scratch, target)
        except BaseException:
            os.replace(old, target)  # put the previous checkpoint back under its name
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(scratch, target)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``target`` only if the block finishes (one process)."""
    target = Path(target)
    remove_leftovers(target, "tmp")
    scratch = new_scratch_directory(target)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    commit_directory(scratch, target)
    remove_leftovers(target, "old")


# -- what crashed saves leave behind -------------------------------------------------------------------------------
def leftovers(target: Path, kind: str) -> list[tuple[Path, int]]:
    """The ``.<name>.tmp-*`` (``kind="tmp"``) or ``.<name>.old-*`` (``"old"``) folders beside ``target``, with writer ids."""
    target = Path(target)
    pattern = re.compile(_LEFTOVER.format(name=re.escape(target.name)))
    if not target.parent.is_dir():
        return []
    found = []
    for path in target.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and match.group(1) == kind and path.is_dir():
            found.append((path, int(match.group(2))))
    return sorted(found)


def _writer_gone(pid: int) -> bool:
    """Whether the process that named a folder is no longer writing it (it exited, or it is this one)."""
    # This process is not in the middle of another save of the same checkpoint.
    return pid == os.getpid() or not psutil.pid_exists(pid)


def remove_leftovers(target: Path, kind: str) -> list[Path]:
    """Remove the ``kind`` folders that crashed saves of ``target`` left (their writer has exited); return them."""
    removed = []
    for path, pid in leftovers(target, kind):
        if _writer_gone(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def find_intact_copy(target: Path) -> Path | None:
    """The previous checkpoint that a save interrupted between its two renames left under ``.<name>.old-<pid>``.

    Only complete copies count (they have ``accelerator.json``, which is written before the
    folder is ever renamed); the newest one when there are several.
    """
    copies = [path for path, _ in leftovers(target, "old") if (path / "accelerator.json").is_file()]
    return max(copies, key=lambda path: path.stat().st_mtime) if copies else None
