"""The Trainer's part of a checkpoint, and the ``latest`` pointer beside the checkpoints.

The Accelerator already saves models, optimizers, schedulers, loader positions, the scaler,
RNG states and, inside an accumulation group, the gradients accumulated so far. The Trainer
adds its loop position, its callbacks' states and the last metrics.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.checkpoint_io import find_intact_copy, read_json, sync_path
from trainer.step_outputs import loss_record

if TYPE_CHECKING:
    from trainer.trainer import Trainer

LATEST = "latest"


class TrainerCheckpointState:
    """Registered with the Accelerator, so it is written and read with the rest of the state."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        state: dict[str, Any] = {
            "progress": trainer.progress.state_dict(),
            "callbacks": trainer.callbacks.state_dict(),
            "metrics": dict(trainer.metrics),
            "should_stop": trainer.should_stop,
            "group_losses": list(trainer._group_losses),  # for the train_loss of a group resumed midway
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = self.trainer
        trainer.progress.load_state_dict(state["progress"])
        trainer.callbacks.load_state_dict(state.get("callbacks", {}))
        trainer.metrics.update(state.get("metrics", {}))
        trainer.should_stop = bool(state.get("should_stop", False))
        trainer._group_losses[:] = [loss_record(torch.as_tensor(loss, device=trainer.accelerator.device))
                                    for loss in state.get("group_losses", [])]


def write_latest(root: Path, checkpoint: Path) -> None:
    """Point ``root/latest`` at ``checkpoint`` (written to a temporary file, then renamed over)."""
    fd, tmp = tempfile.mkstemp(prefix=".latest-", dir=root)
    with os.fdopen(fd, "w") as file:
        file.write(checkpoint.name + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, root / LATEST)
    sync_path(root)


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is a checkpoint folder (``save_state`` renames it into place only once complete)."""
    return (checkpoint / "accelerator.json").is_file()


def saved_step(checkpoint: Path) -> int:
    """The global step a complete checkpoint was taken at."""
    for path in sorted(checkpoint.glob("custom*.json")):
        try:
            state = read_json(path)
        except (OSError, ValueError):  # damaged: loading it says so
            continue
        if isinstance(state, dict) and "progress" in state:
            return int(state["progress"]["global_step"])
    return -1


def find_latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names; if it is missing or incomplete, the newest complete one.

    Where a save over the named checkpoint was interrupted between its two renames, the complete
    previous checkpoint it left (``.<name>.old-<pid>``) is returned, with a warning.
    """
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.name and is_complete(candidate):
            return candidate
        copy = find_intact_copy(candidate) if candidate.name and not candidate.exists() else None
        if copy is not None:  # a save over it stopped between its two renames
            warnings.warn(f"{candidate}, which {pointer} names, does not exist: a save replacing it was interrupted. "
                          f"Resuming from the complete previous checkpoint it left at {copy}.", UserWarning, stacklevel=2)
            return copy
    complete = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p)] \
        if root.is_dir() else []
    if not complete:
        return None
    return max(complete, key=lambda p: (saved_step(p), p.stat().st_mtime))
