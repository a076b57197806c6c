"""Checkpoint directories written atomically (a scratch folder renamed into place).

The files inside follow ``strategies.state_format``: tensors in safetensors, the rest in JSON.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.strategies.state_format import (  # noqa: F401  (the state format, re-exported for trainer's modules)
    join_state,
    load_state_files,
    read_json,
    save_state_files,
    split_state,
    write_json,
)


def new_scratch_directory(target: Path) -> Path:
    """An empty sibling of ``target`` to write a checkpoint into before it replaces ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def commit_directory(scratch: Path, target: Path) -> None:
    """Put the finished ``scratch`` in place of ``target``.

    The previous ``target`` is moved aside first and removed only once the new one is in place,
    so a crash at any point leaves a complete checkpoint on disk (under one of the two names).
    """
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(scratch, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``target`` only if the block finishes (one process)."""
    target = Path(target)
    scratch = new_scratch_directory(target)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    commit_directory(scratch, target)
