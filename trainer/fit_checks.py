"""What ``fit`` checks before it trains, so that a run that cannot succeed fails at once, not an epoch later.

- the training data has batches;
- every callback can act in this run (``Callback.check_fit``: e.g. EarlyStopping needs validation);
- the output and checkpoint folders are writable and have room for a checkpoint;
- no other live run uses the output folder (a lock held for the whole of ``fit``).

Folder checks run on the main process (the folders may be shared); every process raises the same error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer import checkpointing
from trainer.run_lock import OutputDirLockedError, RunLock

if TYPE_CHECKING:
    from trainer.trainer import Trainer


class OutputDirError(OSError):
    """An output or checkpoint folder cannot be written, or has no room for a checkpoint."""


def _unwritable(folder: Path) -> str | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        return (f"The folder {folder} cannot be written ({error.strerror or error}): this run writes its checkpoints "
                "and records there. Choose another output_dir (or ModelCheckpoint dirpath), or make it writable.")
    return None


def checkpoint_bytes(trainer: Trainer) -> int:
    """About what one checkpoint of this run takes: what a save would write now, plus the optimizer state to come.

    Before the first step an optimizer holds no state yet; Adam-like ones (``betas``) then keep two
    tensors per weight, momentum ones one.
    """
    now = checkpointing.estimated_bytes(trainer.accelerator)
    if getattr(trainer.optimizer, "state", None):
        return now
    weights = sum(p.numel() * p.element_size() for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
    defaults = getattr(trainer.optimizer, "defaults", {}) or {}
    return now + weights * (2 if "betas" in defaults else 1 if defaults.get("momentum") else 0)


def _no_room(folder: Path, needed: int) -> str | None:
    free = shutil.disk_usage(folder).free
    if free >= needed:
        return None
    return (f"The folder {folder} has {free:,} bytes free and one checkpoint of this run needs about {needed:,} "
            "(weights and optimizer state): free some space, or choose another output_dir (or ModelCheckpoint dirpath).")


def _folder_problem(trainer: Trainer) -> str | None:
    from trainer.callbacks import ModelCheckpoint

    roots = sorted({cb.root(trainer) for cb in trainer.callbacks.find(ModelCheckpoint)})
    for folder in [trainer.output_dir, *roots]:
        problem = _unwritable(folder)
        if problem:
            return problem
    needed = checkpoint_bytes(trainer) if roots else 0
    for folder in roots:
        problem = _no_room(folder, needed)
        if problem:
            return problem
    return None


def check_data(trainer: Trainer) -> None:
    loader = trainer.train_loader
    if loader is None:
        raise ValueError("fit() needs train_data: pass it to the Trainer.")
    try:
        empty = len(loader) == 0
    except TypeError:  # an iterable dataset: its length is not known before it runs
        return
    if empty:
        dataset = getattr(loader, "dataset", None)
        size = f"{len(dataset)} samples" if isinstance(dataset, Sized) else "its length unknown"
        processes = trainer.accelerator.num_processes
        raise ValueError(
            f"train_data gives no batches ({size}, batch size {getattr(loader, 'batch_size', None)}"
            f"{', drop_last' if getattr(getattr(loader, 'original_dataloader', loader), 'drop_last', False) else ''}"
            f"{f', over {processes} processes' if processes > 1 else ''}): fit() would train nothing. Pass a "
            "non-empty dataset, or a smaller batch_size (or drop_last=False)."
        )


def refuse_empty(data: Any, name: str) -> None:
    """Refuse a dataset (or a DataLoader over one) with no samples, naming the Trainer argument."""
    dataset = getattr(data, "dataset", data)
    if isinstance(dataset, Sized) and len(dataset) == 0:
        raise ValueError(f"{name} is empty (a {type(dataset).__name__} of 0 samples): there is nothing to "
                         f"{'train' if name == 'train_data' else 'run'} on. Pass a dataset with samples, or leave "
                         f"{name} out.")


@contextmanager
def fit_session(trainer: Trainer) -> Iterator[None]:
    """Check the run can succeed, hold the output folder for the run, and give it back at the end."""
    check_data(trainer)
    trainer.callbacks.check_fit(trainer)
    lock = RunLock(trainer.output_dir)
    problem = None
    if trainer.is_main_process:
        problem = _folder_problem(trainer)
        if problem is None:
            try:
                lock.acquire()
            except OutputDirLockedError as error:
                problem = f"locked:{error}"
    problem = trainer.accelerator.strategy.broadcast_object(problem)
    if problem is not None:
        if problem.startswith("locked:"):
            raise OutputDirLockedError(problem.removeprefix("locked:"))
        raise OutputDirError(problem)
    try:
        yield
    finally:
        lock.release()
