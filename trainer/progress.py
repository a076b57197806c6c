"""Where the Trainer's loop is: enough to put a resumed run at exactly the same point."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainerProgress:
    """The loop's position. Saved in every checkpoint as JSON.

    Attributes:
        epoch: the epoch being trained (0-based).
        batch_in_epoch: batches of this epoch already trained on.
        global_step: optimizer steps taken (accumulation boundaries), over the whole run.
        epoch_end_done: this epoch's end (validation, on_train_epoch_end) has run.
        validated_at: ``[epoch, batch_in_epoch]`` of the last validation, so a resumed run does not
            validate twice at the same point nor skip one that was due.
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    epoch_end_done: bool = False
    validated_at: list[int] = field(default_factory=lambda: [-1, -1])

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, list(value) if key == "validated_at" else value)

    @property
    def position(self) -> list[int]:
        return [self.epoch, self.batch_in_epoch]

    def start_next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_end_done = False
