"""StochasticWeightAveraging: average the weights of the last epochs, with ``torch.optim.swa_utils``."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from .base import Callback
from .ema import refuse_sharded
from .model_summary import bare_model

if TYPE_CHECKING:
    from .protocols import TrainerView

STRATEGIES = ("cos", "linear")


class _CallWithBatch(nn.Module):
    """Calls the model on a batch as the Trainer does: a dict as keyword arguments (``update_bn`` passes
    a tuple's first element, and anything else as it is)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> Any:
        return self.model(**batch) if isinstance(batch, Mapping) else self.model(batch)


def _check_arguments(swa_lrs: Any, swa_epoch_start: Any, annealing_epochs: Any, annealing_strategy: Any) -> None:
    def positive(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0

    lrs = swa_lrs if isinstance(swa_lrs, Sequence) and not isinstance(swa_lrs, str) else [swa_lrs]
    if not lrs or not all(positive(lr) for lr in lrs):
        raise ValueError(f"StochasticWeightAveraging(swa_lrs={swa_lrs!r}): use a positive learning rate, or a list "
                         "of them (one per parameter group of the optimizer).")
    fraction = isinstance(swa_epoch_start, float) and 0 < swa_epoch_start < 1
    epoch = isinstance(swa_epoch_start, int) and not isinstance(swa_epoch_start, bool) and swa_epoch_start >= 0
    if not (fraction or epoch):
        raise ValueError(f"StochasticWeightAveraging(swa_epoch_start={swa_epoch_start!r}): use an epoch number "
                         "(a whole number >= 0, counted from 0) or a fraction of max_epochs between 0 and 1, such as 0.8.")
    if not isinstance(annealing_epochs, int) or isinstance(annealing_epochs, bool) or annealing_epochs < 0:
        raise ValueError(f"StochasticWeightAveraging(annealing_epochs={annealing_epochs!r}): use a whole number >= 0.")
    if annealing_strategy not in STRATEGIES:
        raise ValueError(f"StochasticWeightAveraging(annealing_strategy={annealing_strategy!r}): use 'cos' or 'linear'.")


class StochasticWeightAveraging(Callback):
    """Stochastic Weight Averaging (Izmailov et al., 2018): average the weights reached at the end of each epoch
    from ``swa_epoch_start`` on, with the learning rate annealed to ``swa_lrs``; the model ends with the average.

    From the first epoch of SWA on, the learning rate of each optimizer step comes from a
    ``torch.optim.swa_utils.SWALR`` schedule, stepped at each epoch's end: it starts at the rate
    the optimizer had then and reaches ``swa_lrs`` after ``annealing_epochs`` epochs (the Trainer's
    own scheduler no longer sets the rate). At the end of each of those epochs the weights are
    folded into a ``torch.optim.swa_utils.AveragedModel``. When ``fit`` ends, the average is
    copied into the model and ``update_bn`` recomputes the BatchNorm statistics (if the model
    has any) in one pass over the training data.

    Args:
        swa_lrs: the learning rate to anneal to: one, or one per parameter group.
        swa_epoch_start: the first epoch averaged: an epoch number (from 0), or a fraction of
            ``max_epochs`` (``0.8``: the epochs from ``int(0.8 * max_epochs)`` on).
        annealing_epochs: epochs over which the rate goes to ``swa_lrs``.
        annealing_strategy: ``"cos"`` or ``"linear"``.

    The average and the schedule are saved in every checkpoint, so a resumed run ends with the
    same averaged weights as one never stopped. ``averaged_model`` is the ``AveragedModel``.
    Like ``EMA``, it runs before the other callbacks at each event, so that a checkpoint written
    at an epoch's end holds that epoch's average, and a ``LearningRateMonitor`` sees the SWA rate.
    Weights sharded over processes (FSDP, ZeRO-3) are refused; with several processes each
    recomputes the BatchNorm statistics over its own part of the data.
    """

    computes_metrics = True  # first at every event: see the class docstring

    def __init__(self, swa_lrs: float | Sequence[float], swa_epoch_start: int | float = 0.8,
                 annealing_epochs: int = 10, annealing_strategy: str = "cos") -> None:
        _check_arguments(swa_lrs, swa_epoch_start, annealing_epochs, annealing_strategy)
        self.swa_lrs: float | list[float] = (
            [float(lr) for lr in swa_lrs] if isinstance(swa_lrs, Sequence) else float(swa_lrs))
        self.swa_epoch_start = swa_epoch_start
        self.annealing_epochs, self.annealing_strategy = annealing_epochs, annealing_strategy
        self.averaged_model: AveragedModel | None = None
        self._shadow: torch.optim.Optimizer | None = None  # holds the SWA rates; SWALR steps it
        self._schedule: SWALR | None = None
        self._loaded: dict[str, Any] | None = None  # the averaged model's state, until the model is known

    def start_epoch(self, trainer: TrainerView) -> int:
        """The first epoch averaged (from 0), with a fraction resolved against the run's ``max_epochs``."""
        if isinstance(self.swa_epoch_start, int):
            return self.swa_epoch_start
        return int(self.swa_epoch_start * int(trainer.run_config()["max_epochs"]))

    @property
    def started(self) -> bool:
        """Whether the SWA epochs have begun."""
        return self._schedule is not None

    def check_fit(self, trainer: TrainerView) -> None:
        """Refuse runs that can never average: SWA starting after the last epoch, a fraction of epochs in a run
        bounded by ``max_steps``, a wrong number of ``swa_lrs``, weights sharded over processes."""
        config = trainer.run_config()
        if isinstance(self.swa_epoch_start, float) and config.get("max_steps") is not None:
            raise ValueError(f"StochasticWeightAveraging(swa_epoch_start={self.swa_epoch_start}) is a fraction of "
                             f"max_epochs, but this run stops at max_steps={config['max_steps']}: give swa_epoch_start "
                             "as an epoch number instead.")
        if config.get("max_steps") is None and self.start_epoch(trainer) >= int(config["max_epochs"]):
            raise ValueError(f"StochasticWeightAveraging starts at epoch {self.start_epoch(trainer)} (from 0), and "
                             f"this run trains {config['max_epochs']} epochs: it would never average. Lower "
                             "swa_epoch_start or raise max_epochs.")
        groups = len(trainer.optimizer.param_groups)
        if isinstance(self.swa_lrs, list) and len(self.swa_lrs) != groups:
            raise ValueError(f"StochasticWeightAveraging got {len(self.swa_lrs)} swa_lrs for an optimizer with "
                             f"{groups} parameter groups: give one rate, or one per group.")
        refuse_sharded(bare_model(trainer), "StochasticWeightAveraging")

    # -- events -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: TrainerView) -> None:
        """``fit`` begins (after a resume's checkpoint is loaded): rebuild a restored average on the model's devices."""
        if self._loaded is not None:
            loaded, self._loaded = self._loaded, None
            self.averaged_model = self._new_average(bare_model(trainer))
            self.averaged_model.load_state_dict(loaded)

    def on_train_epoch_start(self, trainer: TrainerView) -> None:
        """An epoch begins: at the first SWA epoch, start the SWALR schedule from the optimizer's current rates."""
        if not self.started and trainer.current_epoch >= self.start_epoch(trainer):
            self._start_schedule([group["lr"] for group in trainer.optimizer.param_groups])

    def on_before_optimizer_step(self, trainer: TrainerView, optimizer: Any) -> None:
        """Before each optimizer step of the SWA epochs: set the learning rates of the SWALR schedule."""
        if self._shadow is not None:
            for group, shadow in zip(optimizer.param_groups, self._shadow.param_groups):
                group["lr"] = shadow["lr"]

    def on_train_epoch_end(self, trainer: TrainerView) -> None:
        """An SWA epoch's batches are done: fold the weights into the average, then step the SWALR schedule."""
        if self._schedule is None or self._shadow is None:
            return
        model = bare_model(trainer)
        if self.averaged_model is None:
            self.averaged_model = self._new_average(model)
        self.averaged_model.update_parameters(model)
        self._shadow.step()  # no gradients: changes nothing, but keeps the scheduler's order check quiet
        self._schedule.step()

    def on_fit_end(self, trainer: TrainerView) -> None:
        """``fit`` finished: copy the average into the model, then recompute BatchNorm statistics over the training data."""
        average = self.averaged_model
        if average is None or int(average.n_averaged) == 0:
            warnings.warn("StochasticWeightAveraging: fit ended before an SWA epoch was complete, so the model keeps "
                          "its own weights. Lower swa_epoch_start or train more epochs.", UserWarning, stacklevel=2)
            return
        model = bare_model(trainer)
        with torch.no_grad():
            for averaged, own in zip(average.module.parameters(), model.parameters()):
                own.copy_(averaged)
            if trainer.train_loader is not None:
                update_bn(trainer.train_loader, _CallWithBatch(model))

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _new_average(model: nn.Module) -> AveragedModel:
        average = AveragedModel(model)
        # A mixed-precision forward set on the model's instance would, copied, still call the model:
        # the copy runs its class's forward.
        for name in ("forward", "_original_forward"):
            vars(average.module).pop(name, None)
        return average

    def _start_schedule(self, lrs: list[float], schedule: dict[str, Any] | None = None) -> None:
        # SWALR computes the rates on a stand-in optimizer with one empty group per real group: the
        # Trainer's own scheduler keeps stepping the real one, and would otherwise skew SWALR's sums.
        self._shadow = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in lrs])
        self._schedule = SWALR(self._shadow, swa_lr=self.swa_lrs,  # type: ignore[arg-type]
                               anneal_epochs=self.annealing_epochs, anneal_strategy=self.annealing_strategy)  # type: ignore[arg-type]
        if schedule is not None:
            self._schedule.load_state_dict(schedule)
            for group, lr in zip(self._shadow.param_groups, lrs):
                group["lr"] = lr

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The averaged model (tensors), the current SWA rates and the SWALR schedule's position."""
        average = self.averaged_model.state_dict() if self.averaged_model is not None else self._loaded
        if self._schedule is None or self._shadow is None:
            return {"average": average, "lrs": None, "schedule": None}
        return {"average": average, "lrs": [group["lr"] for group in self._shadow.param_groups],
                "schedule": self._schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule now, and the average when ``fit`` begins (it needs the model)."""
        self._loaded = state.get("average")
        self.averaged_model = None
        self._shadow = self._schedule = None
        if state.get("lrs") is not None:
            self._start_schedule([float(lr) for lr in state["lrs"]], state["schedule"])
