"""LearningRateMonitor: log the learning rate each optimizer step uses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Callback

if TYPE_CHECKING:
    from .protocols import TrainerView


class LearningRateMonitor(Callback):
    """Logs ``lr-<Optimizer>`` (``/pg<i>`` per extra parameter group) every ``log_every_n_steps`` steps.

    The value logged is the one the step about to happen uses, i.e. before the scheduler moves it.
    """

    def __init__(self, log_every_n_steps: int = 1) -> None:
        self.log_every_n_steps = log_every_n_steps

    def on_before_optimizer_step(self, trainer: TrainerView, optimizer: Any) -> None:
        # global_step counts finished steps, so this is step number global_step + 1.
        if (trainer.global_step + 1) % self.log_every_n_steps:
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        groups = optimizer.param_groups
        name = f"lr-{type(inner).__name__}"
        for index, group in enumerate(groups):
            trainer.log(name if len(groups) == 1 else f"{name}/pg{index}", group["lr"])
