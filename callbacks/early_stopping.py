"""EarlyStopping: stop training when a validation metric stops improving."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .base import Callback
from .model_checkpoint import MODES, metric_or_error

if TYPE_CHECKING:
    from .protocols import TrainerView


class EarlyStopping(Callback):
    """Set ``trainer.should_stop`` after ``patience`` validations without improvement.

    Args:
        monitor: the validation metric to watch.
        mode: ``"min"`` (lower is better) or ``"max"``.
        patience: validations without improvement before stopping.
        min_delta: the smallest change that counts as an improvement.
        check_finite: stop at once when the metric becomes NaN or infinite.

    Its state (best value, validations waited) is saved in checkpoints, so a resumed run keeps
    counting where the interrupted one was.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0,
                 check_finite: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"EarlyStopping(mode={mode!r}): use 'min' or 'max'.")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping(patience={patience!r}): use a whole number >= 1.")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.check_finite = abs(min_delta), check_finite
        self.best: float | None = None
        self.wait = 0
        self.stopped_at_step: int | None = None

    @property
    def state_key(self) -> str:
        return f"EarlyStopping[{self.monitor}]"

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def check_fit(self, trainer: TrainerView) -> None:
        if not trainer.validates:
            raise ValueError(
                f"EarlyStopping(monitor={self.monitor!r}) can never stop the run: it watches a validation metric and "
                "this run does not validate (it has no eval_data, or eval_every_n_steps and eval_every_n_epochs are "
                "both None). Pass eval_data to the Trainer, or remove EarlyStopping."
            )

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        if not trainer.fitting:
            return
        value = metric_or_error(metrics, self.monitor, "EarlyStopping")
        if self.check_finite and not math.isfinite(value):
            self._stop(trainer, value)
            return
        if self._improved(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._stop(trainer, value)

    def _stop(self, trainer: TrainerView, value: float) -> None:
        trainer.should_stop = True
        self.stopped_at_step = trainer.global_step
        if trainer.is_main_process:
            why = (f"it is {value}" if not math.isfinite(value) else
                   f"{self.wait} validation(s) without improving on {self.best:.6g} (patience {self.patience}, "
                   f"min_delta {self.min_delta:g}, mode {self.mode!r}); last {value:.6g}")
            print(f"EarlyStopping stopped training at step {trainer.global_step}: {self.monitor} {why}.", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_at_step": self.stopped_at_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))
        self.stopped_at_step = state.get("stopped_at_step")
