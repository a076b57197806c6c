"""When the Trainer steps the learning-rate scheduler: each optimizer step, each epoch, or on a monitored metric.

``configure_optimizers`` may return Lightning's forms: ``{"optimizer": o, "lr_scheduler": {"scheduler": s,
"interval": "step" | "epoch", "frequency": n, "monitor": "val_loss"}}`` (a config dict follows
Lightning's defaults: ``interval="epoch"``, ``frequency=1``). A scheduler given bare steps after
every optimizer step, as the Trainer always has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainer.callbacks.model_checkpoint import metric_or_error

CONFIG_KEYS = {"scheduler", "interval", "frequency", "monitor", "name", "strict"}


@dataclass
class SchedulePlan:
    """A prepared scheduler and when to step it."""

    scheduler: Any
    interval: str = "step"
    frequency: int = 1
    monitor: str | None = None

    def after_optimizer_step(self, global_step: int, metrics: Mapping[str, float]) -> None:
        """Called after each optimizer step (``global_step`` already counts it)."""
        if self.scheduler is not None and self.interval == "step" and global_step % self.frequency == 0:
            self._step(metrics)

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Called at the end of each epoch (``epoch`` counted from 0), after its validation."""
        if self.scheduler is not None and self.interval == "epoch" and (epoch + 1) % self.frequency == 0:
            self._step(metrics)

    def _step(self, metrics: Mapping[str, float]) -> None:
        # Per step, the prepared scheduler (it skips the steps the optimizer skipped); per epoch, the scheduler itself.
        scheduler = self.scheduler if self.interval == "step" else getattr(self.scheduler, "scheduler", self.scheduler)
        if self.monitor is None:
            scheduler.step()
        else:
            scheduler.step(metric_or_error(dict(metrics), self.monitor, "The LR scheduler"))


def scheduler_config(given: Any, monitor: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(the scheduler, how to step it) from a scheduler or a Lightning scheduler config dict."""
    if not isinstance(given, Mapping):
        return given, {"interval": "step", "frequency": 1, "monitor": monitor}
    unknown = set(given) - CONFIG_KEYS
    if "scheduler" not in given or unknown:
        raise ValueError(f"A scheduler config is a dict with 'scheduler' and optionally {sorted(CONFIG_KEYS - {'scheduler'})}; "
                         f"got the keys {sorted(given)}.")
    interval, frequency = given.get("interval", "epoch"), given.get("frequency", 1)
    if interval not in ("step", "epoch"):
        raise ValueError(f"scheduler config interval={interval!r}: use 'step' (after each optimizer step) or 'epoch'.")
    if not isinstance(frequency, int) or isinstance(frequency, bool) or frequency < 1:
        raise ValueError(f"scheduler config frequency={frequency!r}: use a whole number >= 1.")
    return given["scheduler"], {"interval": interval, "frequency": frequency, "monitor": given.get("monitor", monitor)}


def check_plateau(scheduler: Any, monitor: str | None) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and monitor is None:
        raise ValueError("ReduceLROnPlateau steps on a metric: return {'optimizer': optimizer, 'lr_scheduler': "
                         "{'scheduler': scheduler, 'monitor': 'val_loss'}} from configure_optimizers.")
