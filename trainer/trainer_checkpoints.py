"""The Trainer's checkpoint methods: save (``latest`` only for finite weights), find the newest, resume."""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from trainer.callbacks import ModelCheckpoint
from trainer.checkpoint_state import find_latest, saved_step, write_latest
from trainer.graceful_stop import StopSignals, TrainingInterrupted
from trainer.nonfinite import has_nonfinite_parameters

if TYPE_CHECKING:
    from trainer.accelerator import Accelerator
    from trainer.callbacks.bus import CallbackBus
    from trainer.callbacks.protocols import TrainerView
    from trainer.progress import TrainerProgress


def finish_pending_save(accelerator: Accelerator, cause: BaseException) -> None:
    """While ``fit`` fails with ``cause``: let an asynchronous save in progress land; its own failure only warns."""
    try:
        accelerator.wait_for_checkpoint()
    except Exception as error:
        warnings.warn(f"The asynchronous checkpoint save in progress failed too ({error}) while the run stopped on "
                      f"{type(cause).__name__}.", RuntimeWarning, stacklevel=3)


class TrainerCheckpoints:
    """Mixed into ``Trainer``: everything about writing and finding its checkpoints."""

    accelerator: Accelerator
    model: nn.Module
    callbacks: CallbackBus
    checkpoint_dir: Path
    progress: TrainerProgress
    _stop: StopSignals

    call: Callable[..., None]  # the Trainer's event dispatch: call(event, *args)

    def save_checkpoint(self, path: str | os.PathLike, point_latest: bool | None = None, blocking: bool = True,
                        after_commit: Callable[[Path], None] | None = None) -> Path:
        """Write the whole training state to ``path`` (atomically) and point ``latest`` at it.

        ``latest`` is left alone when the weights are not finite (or ``point_latest=False``), so
        that ``fit(resume="latest")`` resumes from the newest checkpoint that can train on.
        ``blocking=False`` returns once the state is copied; ``latest`` moves (and
        ``after_commit(path)`` runs, on every process) once a background thread has put it in place.
        """
        path = Path(path)
        if point_latest is None:
            point_latest = self.weights_are_finite()
        main = self.accelerator.is_main_process

        def committed(saved: Path) -> None:
            if main and point_latest:
                self.point_latest_to(saved)
            if after_commit is not None:
                after_commit(saved)

        saved = self.accelerator.save_state(path, before_commit=lambda scratch: self.call("on_save_checkpoint", scratch),
                                            blocking=blocking, after_commit=committed)
        if not point_latest:
            self.accelerator.print(f"The weights saved in {saved} are not all finite: 'latest' still names the "
                                   "previous checkpoint.")
        return saved  # a blocking save_state returned once every process saw latest point at it

    def weights_are_finite(self) -> bool:
        """Whether every weight of the model is finite (on every process)."""
        flag = has_nonfinite_parameters(self.accelerator.unwrap_model(self.model))
        return not bool(self.accelerator.reduce(flag.int()) > 0)

    def load_weights(self, ckpt: str | os.PathLike) -> Path:
        """Load only the model's weights from ``"best"`` (the monitored ModelCheckpoint's), ``"last"`` or a checkpoint."""
        if str(ckpt) == "best":
            monitored = [cb for cb in self.callbacks.find(ModelCheckpoint) if cb.monitor is not None]
            best = next((cb.best_model_path for cb in monitored if cb.best_model_path), "")
            if not best:
                raise ValueError("ckpt='best' needs a ModelCheckpoint(monitor=...) that has saved a checkpoint; this run "
                                 f"has {'none with a monitor' if not monitored else 'no checkpoint from it yet'}. "
                                 "Use ckpt='last', a checkpoint folder, or None.")
            path = Path(best)
        elif str(ckpt) == "last":
            newest = self._newest_checkpoint()
            if newest is None:
                raise FileNotFoundError(f"ckpt='last': no checkpoint in {', '.join(map(str, self._checkpoint_roots()))}.")
            path = newest
        else:
            path = Path(ckpt)
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{path} has no model.safetensors to load the weights from: give a checkpoint "
                                    "folder written by save_state (one whose strategy saves whole weights).")
        self.accelerator.strategy.load_module(self.model, weights)
        return path

    def stop_on_signal(self, signum: int) -> None:
        """Save a checkpoint here (``latest`` names it), requeue a preempted SLURM job, raise ``TrainingInterrupted``."""
        name = f"epoch={self.progress.epoch}-step={self.progress.global_step}"
        if self.accelerator.accumulation.micro_step:
            name += f"-batch={self.progress.batch_in_epoch}"
        path = self.save_checkpoint(self.checkpoint_dir / name)
        requeued = self._stop.requeue(signum) if self.accelerator.is_main_process else None
        self.accelerator.print(f"Stopping on {signal.Signals(signum).name} at step {self.progress.global_step}: saved "
                               f"{path}{f'; {requeued}' if requeued else ''}. fit(resume='latest') continues from it.")
        raise TrainingInterrupted(signum, path)

    def _agree_at_step(self, nonfinite: bool) -> bool:
        """With several processes, before each optimizer step: one collective for two answers.

        Returns whether any process saw a non-finite loss or gradient norm; sets the signal every
        process stops on after this step (the largest any has received), or None.
        """
        flags = torch.tensor([int(nonfinite), self._stop.received or 0], device=self.accelerator.device)
        flags = self.accelerator.strategy.all_reduce(flags, "max")
        self._stop.agreed = int(flags[1]) or None
        return bool(flags[0])

    def point_latest_to(self, checkpoint: Path) -> None:
        """Make ``fit(resume="latest")`` resume from ``checkpoint`` (a file ``latest`` beside it)."""
        write_latest(checkpoint.parent, checkpoint)

    def _checkpoint_roots(self) -> list[Path]:
        return sorted({self.checkpoint_dir, *(cb.root(cast("TrainerView", self)) for cb in self.callbacks.find(ModelCheckpoint))})

    def _newest_checkpoint(self) -> Path | None:
        found = [path for path in map(find_latest, self._checkpoint_roots()) if path is not None]
        return max(found, key=lambda checkpoint: (saved_step(checkpoint), checkpoint.stat().st_mtime)) if found else None

    def _recovery_hint(self) -> str:
        newest = self._newest_checkpoint()
        if newest is None:
            return "No checkpoint with finite weights was saved yet."
        return f"The newest checkpoint with finite weights is {newest}: fit(resume='latest') continues from it."

    def _resume(self, resume: str | os.PathLike) -> None:
        if str(resume) == "latest":
            newest = self._newest_checkpoint()
            if newest is None:
                places = ", ".join(str(root) for root in self._checkpoint_roots())
                self.accelerator.print(f"No checkpoint in {places}: starting from the beginning.")
                return
            path = newest
        else:
            path = Path(resume)
        path = self.accelerator.load_state(path)
        if self.progress.epoch_end_done:  # saved at the very end of an epoch
            self.progress.start_next_epoch()
        self.accelerator.print(f"Resumed from {path}: step {self.progress.global_step}, epoch {self.progress.epoch}, "
                               f"batch {self.progress.batch_in_epoch} of it.")
        self.call("on_load_checkpoint", path)
