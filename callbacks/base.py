"""The Callback base class and the names of the events a Trainer emits, in loop order."""

from __future__ import annotations

from typing import Any

EVENTS = (
    "on_fit_start", "on_train_epoch_start", "on_train_batch_start", "on_before_backward",
    "on_after_backward", "on_before_optimizer_step", "on_train_batch_end", "on_validation_start",
    "on_validation_batch_end", "on_validation_end", "on_train_epoch_end", "on_save_checkpoint",
    "on_load_checkpoint", "on_predict_start", "on_predict_batch_end", "on_predict_end",
    "on_exception", "on_fit_end",
)


class Callback:
    """Override the events you need; each receives the trainer first.

    A callback with state implements ``state_dict`` / ``load_state_dict``; what it returns is
    saved in checkpoints and handed back on resume.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
