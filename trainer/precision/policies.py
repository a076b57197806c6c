"""Precision policies: how the forward pass is cast and how the loss and the step are handled.

A precision string (``"fp16"``, ``"bf16"``...) is resolved once, by ``resolve_precision`` and the
table in ``trainer.precision.names``, into one of the objects below; the rest of the code only
calls their methods (the ``PrecisionPolicy`` protocol of ``trainer.strategies.policies``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from trainer.operations import convert_to_fp32


class Precision:
    """Full fp32: nothing is cast or scaled. The base of every precision policy.

    The Accelerator calls, in a training step: ``wrap_forward`` once per prepared model (the
    forward then runs under ``autocast``), ``scale_loss`` in ``backward``, ``unscale_gradients``
    before clipping, ``optimizer_step`` at each accumulation boundary; ``convert_module`` once per
    model before the strategy places it; ``state_dict``/``load_state_dict`` with checkpoints.
    """

    name = "no"
    dtype: torch.dtype | None = None  # what the forward pass computes in; None: fp32
    scaler: torch.amp.GradScaler | None = None  # the fp16 loss scaler, for policies that have one

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.autocast_kwargs: dict[str, Any] = {}  # torch.autocast's arguments (enabled, cache_enabled) for every forward

    @property
    def is_mixed(self) -> bool:
        """Whether the forward pass runs under autocast (parameters stay fp32)."""
        return False

    def autocast(self, **kwargs: Any) -> AbstractContextManager[Any]:
        """Return the context the forward pass runs in (also ``accelerator.autocast()``)."""
        return nullcontext()

    def wrap_forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """Return the module's forward as the training loop should call it (called once per prepared model)."""
        return forward

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Return the module converted for this policy (fp8 swaps its linear layers); identity otherwise.

        Called by ``prepare`` before the strategy places the model.
        """
        return module

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return the loss that backward starts from (called by ``accelerator.backward``)."""
        return loss

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients to their true scale before they are clipped or inspected (once per step)."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer, step: Callable[..., Any], **kwargs: Any) -> bool:
        """Run ``step`` at an accumulation boundary; return False when the step was skipped (fp16 overflow)."""
        step(**kwargs)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Return what the policy keeps in checkpoints (the fp16 loss scale)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (called by ``load_state``)."""


class MixedPrecision(Precision):
    """Autocast the forward pass to ``dtype``; parameters, gradients and outputs stay fp32."""

    def __init__(self, device: torch.device, dtype: torch.dtype, name: str) -> None:
        super().__init__(device)
        self.dtype: torch.dtype | None = dtype
        self.name = name

    @property
    def is_mixed(self) -> bool:
        return True

    def autocast(self, **kwargs: Any) -> AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.dtype, **{**self.autocast_kwargs, **kwargs})

    def wrap_forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(forward)
        def autocast_forward(*args: Any, **kwargs: Any) -> Any:
            with self.autocast():
                output = forward(*args, **kwargs)
            # Outputs go back to fp32 so the loss and the metrics are computed at full precision.
            return convert_to_fp32(output)

        autocast_forward.__wrapped__ = forward
        return autocast_forward


class SkippedStepsError(FloatingPointError):
    """fp16 optimizer steps were skipped (inf/NaN gradients) until the run could not be learning anything."""


# What an fp16 run tolerates before it warns and stops (``Float16Precision``'s defaults). A healthy run
# skips a few steps while the scaler finds its scale (from 2**16, each skip halves it) and one now and
# then after; a scale below 2**-10 means gradients overflow fp16 even divided by a thousand.
WARN_AFTER_SKIPPED_STEPS = 10
MAX_SKIPPED_STEPS = 100
MIN_LOSS_SCALE = 2.0**-10
_CAUSES = ("check that the loss is finite in fp32 too (the data, the loss function), lower the learning rate, "
           "or train with mixed_precision='bf16'")


def _check_threshold(name: str, value: float | None, integer: bool) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int))
    if value is not None and (bad or not math.isfinite(value) or value <= 0):
        kind = "a positive int" if integer else "a positive number"
        raise ValueError(f"Float16Precision({name}={value!r}): give {kind}, or None to turn the check off.")


def _check_scaler_arguments(scaler_kwargs: dict[str, Any]) -> None:
    """Names GradScaler does not take are one error with the valid ones, not a TypeError from inside torch."""
    known = [p for p in inspect.signature(torch.amp.GradScaler).parameters if p != "device"]
    for name in scaler_kwargs:
        if name not in known:
            valid = [*known, "warn_after_skipped_steps", "max_skipped_steps", "min_loss_scale"]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"Unknown fp16 scaler argument {name!r}.{hint} Valid: {', '.join(valid)}.")


class Float16Precision(MixedPrecision):
    """fp16 autocast with a GradScaler: the loss is scaled, overflowing steps are skipped.

    A run whose steps keep being skipped learns nothing while the scale falls towards zero, so
    the policy watches them: after ``warn_after_skipped_steps`` skipped steps in a row it warns
    (``RuntimeWarning``), and it raises ``SkippedStepsError`` after ``max_skipped_steps`` in a row or
    when a skipped step leaves the loss scale below ``min_loss_scale``. The weights are those of the
    last applied step. None turns a check off; the attributes of the same names can be changed on
    ``accelerator.precision`` at any time. Other keyword arguments go to ``torch.amp.GradScaler``.
    """

    scaler: torch.amp.GradScaler

    def __init__(self, device: torch.device, *, warn_after_skipped_steps: int | None = WARN_AFTER_SKIPPED_STEPS,
                 max_skipped_steps: int | None = MAX_SKIPPED_STEPS, min_loss_scale: float | None = MIN_LOSS_SCALE,
                 **scaler_kwargs: Any) -> None:
        _check_threshold("warn_after_skipped_steps", warn_after_skipped_steps, integer=True)
        _check_threshold("max_skipped_steps", max_skipped_steps, integer=True)
        _check_threshold("min_loss_scale", min_loss_scale, integer=False)
        _check_scaler_arguments(scaler_kwargs)
        super().__init__(device, torch.float16, "fp16")
        self.scaler = torch.amp.GradScaler(device.type, **scaler_kwargs)
        self.warn_after_skipped_steps = warn_after_skipped_steps
        self.max_skipped_steps = max_skipped_steps
        self.min_loss_scale = min_loss_scale
        self.steps = 0  # optimizer steps taken or skipped through this policy
        self.skipped_in_a_row = 0
        self.skipped = 0
        self._unscaled: set[int] = set()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) not in self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, step: Callable[..., Any], **kwargs: Any) -> bool:
        # The scale drops only when an inf/nan was found, i.e. when the step was skipped. Reading
        # it works for every optimizer: fused and foreach ones receive found_inf and skip inside
        # their kernel, so "was optimizer.step called" would say nothing for them.
        # GradScaler keys its bookkeeping by the optimizer object, so it must call the optimizer's
        # own step (strategies that need their own step, like DeepSpeed, scale losses themselves).
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        self._unscaled.discard(id(optimizer))
        stepped = self.scaler.get_scale() >= scale_before
        self._watch_skips(stepped)
        return stepped

    def _watch_skips(self, stepped: bool) -> None:
        """Count skipped steps; warn, then raise, when they show the run is learning nothing."""
        self.steps += 1
        if stepped:
            self.skipped_in_a_row = 0
            return
        self.skipped += 1
        self.skipped_in_a_row += 1
        scale, streak = self.scaler.get_scale(), self.skipped_in_a_row
        what = (f"fp16: optimizer step {self.steps} was skipped for inf/NaN gradients, the last {streak} in a row "
                f"({self.skipped} skipped so far), and the loss scale is now {scale:.3g}")
        if self.max_skipped_steps is not None and streak >= self.max_skipped_steps:
            raise SkippedStepsError(f"{what}, reaching max_skipped_steps={self.max_skipped_steps}: the run is learning "
                                    f"nothing. To fix it, {_CAUSES}.")
        if self.min_loss_scale is not None and scale < self.min_loss_scale:
            raise SkippedStepsError(f"{what}, below min_loss_scale={self.min_loss_scale:.3g}: the run is learning "
                                    f"nothing. To fix it, {_CAUSES}.")
        if self.warn_after_skipped_steps is not None and streak == self.warn_after_skipped_steps:
            limits = []
            if self.max_skipped_steps is not None:
                limits.append(f"{self.max_skipped_steps} in a row")
            if self.min_loss_scale is not None:
                limits.append(f"a scale below {self.min_loss_scale:.3g}")
            stop = f"; the run stops at {' or '.join(limits)}" if limits else ""
            warnings.warn(f"{what}. If this goes on the run learns nothing: {_CAUSES}{stop}.", RuntimeWarning,
                          stacklevel=4)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
