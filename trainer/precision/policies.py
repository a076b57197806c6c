"""Precision policies: how the forward pass is cast and how the loss and the step are handled.

A precision string (``"fp16"``, ``"bf16"``...) is resolved once, by ``resolve_precision`` and the
table in ``trainer.precision.names``, into one of the objects below; the rest of the code only
calls their methods (the ``PrecisionPolicy`` protocol of ``trainer.strategies.policies``).
"""

from __future__ import annotations

import functools
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


class Float16Precision(MixedPrecision):
    """fp16 autocast with a GradScaler: the loss is scaled, overflowing steps are skipped."""

    scaler: torch.amp.GradScaler

    def __init__(self, device: torch.device, **scaler_kwargs: Any) -> None:
        super().__init__(device, torch.float16, "fp16")
        self.scaler = torch.amp.GradScaler(device.type, **scaler_kwargs)
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
        return self.scaler.get_scale() >= scale_before

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

