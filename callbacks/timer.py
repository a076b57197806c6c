"""Timer: stop training once a time budget is spent (``Trainer(max_time=...)`` adds one)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .base import Callback

if TYPE_CHECKING:
    from .protocols import TrainerView


class Timer(Callback):
    """Set ``trainer.should_stop`` after the optimizer step that uses up ``duration`` of training time.

    The time spent so far is saved in checkpoints, so a resumed run keeps counting. Under several
    processes the main process's clock decides, so that every process stops at the same step.
    """

    def __init__(self, duration: timedelta) -> None:
        if not isinstance(duration, timedelta) or duration.total_seconds() <= 0:
            raise ValueError(f"Timer(duration={duration!r}): use a positive datetime.timedelta.")
        self.duration = duration
        self.elapsed = 0.0  # seconds, over this run and the runs it resumed
        self._started: float | None = None

    def on_fit_start(self, trainer: TrainerView) -> None:
        """Start the clock."""
        self._started = time.monotonic()

    def time_elapsed(self) -> float:
        """Seconds of training so far."""
        return self.elapsed + (time.monotonic() - self._started if self._started is not None else 0.0)

    def on_train_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After each optimizer step: stop when the budget is spent (the main process decides for all)."""
        if not trainer.accelerator.sync_gradients:
            return
        spent = self.time_elapsed() >= self.duration.total_seconds()
        if trainer.accelerator.num_processes > 1:
            spent = bool(trainer.accelerator.strategy.broadcast_object(spent))
        if spent:
            trainer.should_stop = True

    def on_fit_end(self, trainer: TrainerView) -> None:
        """Stop the clock."""
        self.elapsed, self._started = self.time_elapsed(), None

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.time_elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.elapsed = float(state.get("elapsed", 0.0))
