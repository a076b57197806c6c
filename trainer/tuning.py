"""Training steps that leave no trace: what the batch-size and learning-rate finders run on.

``TrainingSnapshot`` copies, to the CPU, everything a few training steps change (weights,
buffers, gradients, optimizer, scheduler, loss scale, accumulation position, loader position,
random states, logged metrics, module modes) and puts it back exactly. ``training_steps`` runs
optimizer steps the way ``fit`` does (``training_step``, backward, clipping, the optimizer step)
without events, logging or progress. ``scale_batch_size`` and ``lr_find`` are the finders as
functions, to call before ``fit`` instead of passing a callback.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Generator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from trainer.callbacks.protocols import AcceleratorView, TrainerView
from trainer.random_state import capture_rng_state, restore_rng_state
from trainer.step_outputs import unpack_loss

if TYPE_CHECKING:
    from trainer.callbacks.lr_finder import LRFinderResult


class StatefulView(Protocol):
    """An object whose state can be saved and put back."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TuningAcceleratorView(AcceleratorView, Protocol):
    """The parts of the Accelerator that training steps outside the loop use."""

    @property
    def precision(self) -> StatefulView:
        """The precision policy (its state: the fp16 loss scale)."""
        ...

    @property
    def num_processes(self) -> int:
        """How many processes train together."""
        ...

    def accumulate(self, *models: nn.Module) -> AbstractContextManager[None]:
        """One micro-step of the accumulation policy."""
        ...

    def backward(self, loss: torch.Tensor, num_tokens: Any = None, **kwargs: Any) -> None:
        """Backward, divided for accumulation and scaled for fp16."""
        ...

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor | None:
        """Clip the total gradient norm (at accumulation boundaries)."""
        ...

    def reduce(self, tensor: Any, reduction: str = "sum", scale: float = 1.0) -> Any:
        """Reduce tensors across processes."""
        ...


class TuningView(TrainerView, Protocol):
    """What the finders use of the trainer, beyond ``TrainerView``."""

    @property
    def accelerator(self) -> TuningAcceleratorView:
        """The Accelerator the trainer runs on."""
        ...

    @property
    def scheduler(self) -> Any:
        """The prepared learning-rate scheduler, or None."""
        ...

    @property
    def grad_clip(self) -> float | None:
        """The largest total gradient norm, or None."""
        ...

    def training_step(self, batch: Any) -> Any:
        """The loss of one micro-batch (or a dict with ``loss``)."""
        ...

    def rebuild_train_loader(self, batch_size: int) -> None:
        """Build the training loader again from ``train_data`` with ``batch_size``."""
        ...


def _cpu_copy(value: Any) -> Any:
    """A deep copy of ``value`` with every tensor copied to the CPU (so the copy costs no device memory)."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((key, _cpu_copy(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return copy.deepcopy(value)


class TrainingSnapshot:
    """Everything that training steps change, copied to the CPU when made; ``restore`` puts it back exactly."""

    def __init__(self, trainer: TuningView) -> None:
        self.trainer = trainer
        model, accelerator = trainer.model, trainer.accelerator
        self._tensors = [(tensor, tensor.detach().to("cpu", copy=True))
                         for tensor in itertools.chain(model.parameters(), model.buffers())]
        self._modes = [(module, module.training) for module in model.modules()]
        self._optimizer = _cpu_copy(trainer.optimizer.state_dict())
        self._scheduler = None if trainer.scheduler is None else _cpu_copy(trainer.scheduler.state_dict())
        self._precision = _cpu_copy(accelerator.precision.state_dict())
        self._rng = capture_rng_state()
        self._metrics = dict(trainer.metrics)
        loader = trainer.train_loader
        self._loader = loader.state_dict() if hasattr(loader, "state_dict") else None
        self._gradients = [(parameter, None if parameter.grad is None else parameter.grad.detach().to("cpu", copy=True))
                           for parameter in model.parameters()]
        self._accumulation = self._accumulation_state()

    def _accumulation_state(self) -> tuple[Any, Any]:
        policy: Any = self.trainer.accelerator.accumulation
        return copy.deepcopy(policy.state_dict()), policy.sync_gradients

    def restore_step_state(self) -> None:
        """Put back the gradients and the accumulation position (after a step that failed midway)."""
        for parameter, gradient in self._gradients:
            parameter.grad = None if gradient is None else gradient.to(parameter.device, copy=True)
        policy: Any = self.trainer.accelerator.accumulation
        state, sync = self._accumulation
        policy.load_state_dict(copy.deepcopy(state))
        policy.sync_gradients = sync

    def restore(self) -> None:
        """Put everything back as it was when the snapshot was made."""
        trainer = self.trainer
        with torch.no_grad():
            for tensor, saved in self._tensors:
                tensor.copy_(saved)
        for module, training in self._modes:
            module.training = training
        trainer.optimizer.load_state_dict(self._optimizer)
        if self._scheduler is not None:
            trainer.scheduler.load_state_dict(self._scheduler)
        trainer.accelerator.precision.load_state_dict(self._precision)
        self.restore_step_state()
        loader = trainer.train_loader  # the loader now in use (a batch-size search rebuilt it) goes back to the old place
        if self._loader is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(copy.deepcopy(self._loader), resume=False)
        trainer.metrics.clear()
        trainer.metrics.update(self._metrics)
        restore_rng_state(*self._rng)


def training_steps(trainer: TuningView) -> Generator[float, None, None]:
    """Optimizer steps as ``fit`` takes them, over the training loader (restarted when it ends), forever.

    Each step runs ``training_step`` on the accumulation group's micro-batches with backward,
    clips the gradients (``grad_clip``), steps the optimizer and yields the group's mean loss
    (averaged over processes). No event, log or progress count happens: these steps are for a
    search, whose trace a ``TrainingSnapshot`` removes. The scheduler does not step.
    """
    accelerator, model, optimizer = trainer.accelerator, trainer.model, trainer.optimizer
    model.train()
    while True:
        losses: list[torch.Tensor] = []
        batches = iter(trainer.train_loader)
        produced = False
        try:
            for batch in batches:
                produced = True
                with accelerator.accumulate(model):
                    loss, num_tokens = unpack_loss(trainer.training_step(batch))
                    accelerator.backward(loss, num_tokens=num_tokens)
                    losses.append(loss.detach())
                    boundary = accelerator.sync_gradients
                    if boundary:
                        if trainer.grad_clip is not None:
                            accelerator.clip_grad_norm_(model.parameters(), trainer.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad()
                if boundary:
                    mean = torch.stack(losses).float().mean()
                    losses = []
                    if accelerator.num_processes > 1:
                        mean = accelerator.reduce(mean, "mean")
                    yield float(mean.item())
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if not produced:
            raise ValueError("train_data gave no batches: the search needs training batches to run on.")


def scale_batch_size(trainer: Any, mode: str = "power", steps_per_trial: int = 3, init_val: int = 2,
                     max_trials: int = 25, max_val: int | None = None) -> int:
    """Find the largest batch size that trains without running out of memory, and train with it.

    The function form of ``BatchSizeFinder`` (same arguments), to call before ``fit``: returns the
    batch size found; the trainer's training loader is rebuilt with it and every other state
    is as it was.
    """
    from trainer.callbacks.batch_size_finder import BatchSizeFinder

    finder = BatchSizeFinder(mode=mode, steps_per_trial=steps_per_trial, init_val=init_val, max_trials=max_trials,
                             max_val=max_val)
    finder.check_fit(trainer)
    return finder.scale_batch_size(trainer)


def lr_find(trainer: Any, min_lr: float = 1e-8, max_lr: float = 1.0, num_training_steps: int = 100,
            mode: str = "exponential", early_stop_threshold: float | None = 4.0, update_attr: bool = True,
            plot_path: Any = None) -> LRFinderResult:
    """Run the learning-rate range test and return its result (the curve and ``suggestion``).

    The function form of ``LearningRateFinder`` (same arguments), to call before ``fit``; with
    ``update_attr`` the optimizer then uses the suggested learning rate.
    """
    from trainer.callbacks.lr_finder import LearningRateFinder

    finder = LearningRateFinder(min_lr=min_lr, max_lr=max_lr, num_training_steps=num_training_steps, mode=mode,
                                early_stop_threshold=early_stop_threshold, update_attr=update_attr,
                                plot_path=plot_path)
    finder.check_fit(trainer)
    return finder.lr_find(trainer)
