"""The optimizer and scheduler that ``Accelerator.prepare`` returns.

They keep the user's loop unchanged (``optimizer.step()``, ``optimizer.zero_grad()``,
``scheduler.step()`` on every micro-batch) while acting only where they should: the optimizer
steps and clears gradients on accumulation boundaries only, through the precision policy
(which may skip an overflowing fp16 step), and the scheduler advances only when the optimizer
really stepped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.precision.policies import Precision

if TYPE_CHECKING:
    from trainer.accumulation import GradientAccumulation
    from trainer.strategies import Strategy
    from trainer.strategies.policies import PrecisionPolicy


class NoGradientError(RuntimeError):
    """An optimizer step found no gradient on any of its parameters."""


def check_loss_has_graph(loss: Any) -> None:
    """Refuse a backward from a loss that no parameter contributed to (torch's own error names no cause)."""
    if torch.is_tensor(loss) and not loss.requires_grad:
        raise NoGradientError(
            "backward() was given a loss that does not depend on any parameter (requires_grad=False), so no "
            "parameter would get a gradient. Compute the loss from the prepared model's output, outside "
            "torch.no_grad() and without .detach() or .item() on the way."
        )


class AcceleratedOptimizer(torch.optim.Optimizer):
    """The user's optimizer, stepping on accumulation boundaries through the precision policy."""

    def __init__(self, optimizer: torch.optim.Optimizer, strategy: Strategy, precision: PrecisionPolicy,
                 policy: GradientAccumulation, finalize_gradients: Callable[[], None]) -> None:
        """``finalize_gradients`` divides the gradients by what the accumulation policy left undivided; it is
        called before a step whenever the policy ``needs_finalize``."""
        # No super().__init__: the wrapped optimizer owns param_groups and state.
        self.optimizer = optimizer
        self._strategy = strategy
        self._precision = precision
        self._policy = policy
        self._finalize_gradients = finalize_gradients
        self._strategy_step = strategy.step_function(optimizer)
        # A policy that never skips a step (no fp16 scaler) is not asked: the step is called directly.
        self._plain_step = type(precision).optimizer_step is Precision.optimizer_step
        # torch's own zero_grad(set_to_none=True) wraps the reset in a profiler annotation and per-call setup
        # that cost about as much as all the rest a small step adds: for an optimizer that keeps torch's
        # zero_grad the wrapper sets the gradients to None itself (the same effect), and calls torch's while a
        # profiler records, so that traces keep its annotation.
        self._torch_zero_grad = type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad
        self.step_was_skipped = False

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self._strategy.optimizer_state_dict(self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._strategy.load_optimizer_state_dict(self.optimizer, state_dict)

    def train(self) -> None:
        """Put an optimizer with modes (schedule-free optimizers) in training mode; others have none."""
        if hasattr(self.optimizer, "train"):
            self.optimizer.train()

    def eval(self) -> None:
        """Put an optimizer with modes (schedule-free optimizers) in evaluation mode; others have none."""
        if hasattr(self.optimizer, "eval"):
            self.optimizer.eval()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._policy.sync_gradients:
            return
        if set_to_none and self._torch_zero_grad and not torch.autograd._profiler_enabled():
            for group in self.optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if not self._policy.sync_gradients:
            return
        if closure is None and self._strategy.gradients_present(self.optimizer) is False:
            count = sum(len(group["params"]) for group in self.optimizer.param_groups)
            raise NoGradientError(
                f"optimizer.step(): none of the optimizer's {count} parameters has a gradient, so this step would "
                "change nothing: the loss is not connected to them. Call backward() before step() on a loss computed "
                "from the prepared model's output (not under torch.no_grad(), not from .detach()ed tensors or "
                ".item() values), and build the optimizer from that model's parameters()."
            )
        if self._policy.needs_finalize:
            self._finalize_gradients()
        if closure is None and self._plain_step:
            self._strategy_step()
            stepped = True
        elif closure is None:
            stepped = self._precision.optimizer_step(self.optimizer, self._strategy_step)
        else:
            stepped = self._precision.optimizer_step(self.optimizer, self._strategy_step, closure=closure)
        self.step_was_skipped = not stepped

    def __repr__(self) -> str:
        return f"AcceleratedOptimizer({self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class AcceleratedScheduler:
    """The user's LR scheduler, advancing with the optimizer steps that really happened.

    ``steps_per_update`` scheduler steps follow each optimizer step. The Accelerator gives the
    number of data shards (as Accelerate does, unless batches are split): a schedule sized from
    the unprepared loader then ends when the data does, on any number of processes. Inside an
    accumulation group a call only counts itself (``adjust_scheduler``), as Accelerate's does.
    """

    def __init__(self, scheduler: Any, optimizers: list[AcceleratedOptimizer],
                 policy: GradientAccumulation, step_with_optimizer: bool = True, steps_per_update: int = 1) -> None:
        self.scheduler = scheduler
        self.optimizers = optimizers
        self._policy = policy
        self.step_with_optimizer = step_with_optimizer
        self.steps_per_update = steps_per_update

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self.step_with_optimizer:
            self.scheduler.step(*args, **kwargs)
            return
        if not self._policy.sync_gradients:
            if self._policy.adjust_scheduler and hasattr(self.scheduler, "_step_count"):
                self.scheduler._step_count += 1
            return
        if any(optimizer.step_was_skipped for optimizer in self.optimizers):
            return
        total = getattr(self.scheduler, "total_steps", None)  # OneCycleLR refuses steps past its total
        for _ in range(self.steps_per_update):
            if total is not None and self.scheduler._step_count > total:
                break
            self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)


def is_scheduler(obj: Any) -> bool:
    """Whether ``obj`` is a learning-rate scheduler (``prepare`` wraps those in AcceleratedScheduler): a torch one,
    or a stand-in for one an engine builds (``DummyScheduler``)."""
    from trainer.strategies.deepspeed_config import ConfigScheduler

    return isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau,
                            ConfigScheduler))


def prepare_order(obj: Any) -> int:
    """Preparation order: models, optimizers, schedulers and everything else."""
    if isinstance(obj, nn.Module):
        return 0
    if isinstance(obj, torch.optim.Optimizer):
        return 1
    if is_scheduler(obj):
        return 2
    return 3


def check_optimizer_parameters(optimizer: torch.optim.Optimizer, models: list[nn.Module],
                               optimizers: list[Any]) -> torch.optim.Optimizer:
    """Refuse an optimizer over none of the prepared models' parameters while their trainable ones have no optimizer.

    That is an optimizer built from an earlier or another copy of the model: it would train nothing.
    (An optimizer over parameters kept outside a frozen model, as in prompt tuning, is fine.)
    """
    known = {id(p) for model in models for p in model.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not known or not params or any(id(p) in known for p in params):
        return optimizer
    optimized = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    orphans = [name for model in models for name, p in model.named_parameters()
               if p.requires_grad and id(p) not in optimized]
    if orphans:
        raise ValueError(
            f"The {type(optimizer).__name__} being prepared holds {len(params)} parameters and none of them belongs to "
            f"the prepared model{'s' if len(models) > 1 else ''}, whose trainable parameters ({', '.join(orphans[:3])}"
            f"{', ...' if len(orphans) > 3 else ''}) no optimizer holds: training would never change the model. Build "
            "the optimizer from the parameters of the model you prepare (AdamW(model.parameters())) after creating "
            "that model, not from an earlier or another copy."
        )
    return optimizer
