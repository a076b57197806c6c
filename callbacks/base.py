"""The Callback base class and the events a Trainer emits.

Override the events you need; each receives the trainer first and talks to it through its
public surface (``trainer.model``, ``trainer.global_step``, ``trainer.log``, ``trainer.should_stop``
...). The order in which the events fire is documented as pseudocode in ``docs/trainer.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocols import TrainerView

EVENTS = (
    "on_fit_start", "on_train_epoch_start", "on_train_batch_start", "on_before_backward",
    "on_after_backward", "on_before_optimizer_step", "on_train_batch_end", "on_validation_start",
    "on_validation_batch_end", "on_validation_end", "on_train_epoch_end", "on_save_checkpoint",
    "on_load_checkpoint", "on_predict_start", "on_predict_batch_end", "on_predict_end",
    "on_exception", "on_fit_end",
)


class Callback:
    """Base class: every event is a no-op here, and the bus skips events a callback does not override.

    A callback with state implements ``state_dict`` / ``load_state_dict``; what it returns
    (numbers, strings, lists, dicts, tensors) is saved in checkpoints and handed back on resume.
    Set ``checkpoints = True`` on callbacks that write checkpoints: the bus runs them after all
    others, so that a checkpoint sees the state the other callbacks reached at that event.
    """

    checkpoints = False
    computes_metrics = False  # True: runs before the others, which may read the metrics it adds

    @property
    def state_key(self) -> str:
        """The name this callback's state is saved under (unique per class by default)."""
        return type(self).__qualname__

    def handles(self, event: str) -> bool:
        """Whether this instance wants ``event`` (asked once, when the bus is built).

        Override to leave out events that the instance's settings make no-ops, so they cost nothing
        in the training loop (e.g. a checkpoint callback that never saves on steps).
        """
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_fit_start(self, trainer: TrainerView) -> None: ...
    def on_train_epoch_start(self, trainer: TrainerView) -> None: ...
    def on_train_batch_start(self, trainer: TrainerView, batch: Any, batch_idx: int) -> None: ...
    def on_before_backward(self, trainer: TrainerView, loss: Any) -> None: ...
    def on_after_backward(self, trainer: TrainerView) -> None: ...
    def on_before_optimizer_step(self, trainer: TrainerView, optimizer: Any) -> None: ...
    def on_train_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_start(self, trainer: TrainerView) -> None: ...
    def on_validation_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None: ...
    def on_train_epoch_end(self, trainer: TrainerView) -> None: ...
    def on_save_checkpoint(self, trainer: TrainerView, checkpoint_dir: Path) -> None: ...
    def on_load_checkpoint(self, trainer: TrainerView, checkpoint_dir: Path) -> None: ...
    def on_predict_start(self, trainer: TrainerView) -> None: ...
    def on_predict_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_predict_end(self, trainer: TrainerView) -> None: ...
    def on_exception(self, trainer: TrainerView, exception: BaseException) -> None: ...
    def on_fit_end(self, trainer: TrainerView) -> None: ...
