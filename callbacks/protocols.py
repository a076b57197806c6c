"""The trainer as callbacks and trackers see it: a typed protocol of its public surface.

Callbacks never import the Trainer class (the callbacks package can be read, and tested, on its
own): every hook receives an object that has at least what ``TrainerView`` lists, which the
type checker holds ``trainer.Trainer`` to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import nn


class ProgressView(Protocol):
    """Where the loop is."""

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch done so far."""
        ...

    @property
    def global_step(self) -> int:
        """Optimizer steps taken over the whole run (``trainer.global_step``)."""
        ...


class AccumulationView(Protocol):
    """Where the accumulation group is."""

    @property
    def micro_step(self) -> int:
        """Micro-batches of the current accumulation group done so far (0 at a boundary)."""
        ...


class CollectivesView(Protocol):
    """What moves objects between processes."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of process ``src`` on every process."""
        ...


class AcceleratorView(Protocol):
    """The parts of the Accelerator that callbacks use."""

    @property
    def sync_gradients(self) -> bool:
        """True when the current micro-step ends an accumulation group (the optimizer steps)."""
        ...

    @property
    def optimizer_step_was_skipped(self) -> bool:
        """True when the last optimizer step did not change the weights (fp16 overflow, a skipped non-finite step)."""
        ...

    @property
    def accumulation(self) -> AccumulationView:
        """The accumulation policy."""
        ...

    @property
    def strategy(self) -> CollectivesView:
        """The strategy (for its collectives)."""
        ...

    @property
    def num_processes(self) -> int:
        """How many processes train together."""
        ...

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        """Every process's values, without the samples that even sharding repeated."""
        ...

    def wait_for_everyone(self) -> None:
        """Block until every process gets here."""
        ...


class TrainerView(Protocol):
    """What a callback may read and call on the trainer it is given."""

    should_stop: bool  # a callback sets it to end training after the current step
    metrics: dict[str, float]  # the latest value of everything logged

    @property
    def model(self) -> nn.Module:
        """The prepared model."""
        ...

    @property
    def optimizer(self) -> Any:
        """The prepared optimizer."""
        ...

    @property
    def accelerator(self) -> AcceleratorView:
        """The Accelerator the trainer runs on."""
        ...

    @property
    def progress(self) -> ProgressView:
        """Where the loop is."""
        ...

    @property
    def train_loader(self) -> Any:
        """The prepared training data loader, or None."""
        ...

    @property
    def eval_loader(self) -> Any:
        """The prepared validation data loader, or None."""
        ...

    @property
    def validates(self) -> bool:
        """Whether ``fit`` validates: there is validation data and a schedule (steps or epochs) to run it."""
        ...

    @property
    def global_step(self) -> int:
        """Optimizer steps taken."""
        ...

    @property
    def current_epoch(self) -> int:
        """The epoch running (from 0)."""
        ...

    @property
    def is_main_process(self) -> bool:
        """Whether this is process 0."""
        ...

    @property
    def fitting(self) -> bool:
        """True inside ``fit``."""
        ...

    @property
    def output_dir(self) -> Path:
        """Where the run writes."""
        ...

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go by default."""
        ...

    @property
    def project(self) -> str:
        """The project name trackers file the run under."""
        ...

    @property
    def run_name(self) -> str | None:
        """The run's name in the trackers."""
        ...

    @property
    def log_sequence(self) -> int:
        """How many values ``log`` has recorded so far."""
        ...

    def log(self, name: str, value: Any, sync: bool = False) -> None:
        """Record a value at the current step."""
        ...

    def log_dict(self, values: Mapping[str, Any], sync: bool = False) -> None:
        """Record several values at the current step."""
        ...

    def logged_since(self, sequence: int) -> tuple[int, dict[int, dict[str, float]]]:
        """The values logged after ``sequence``, grouped by step, and the sequence reached."""
        ...

    def run_config(self) -> dict[str, Any]:
        """The run's configuration, as trackers store it."""
        ...

    def save_checkpoint(self, path: str | Path, point_latest: bool | None = None, blocking: bool = True,
                        after_commit: Callable[[Path], None] | None = None) -> Path:
        """Write the whole training state to ``path``; ``latest`` names it if its weights are finite.

        ``blocking=False`` returns once the state is copied; ``after_commit(path)`` runs once it is in place.
        """
        ...

    def weights_are_finite(self) -> bool:
        """Whether every weight of the model is finite (on every process)."""
        ...

    def point_latest_to(self, checkpoint: Path) -> None:
        """Make ``fit(resume="latest")`` resume from ``checkpoint``."""
        ...
