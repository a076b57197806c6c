"""What the DeepSpeed strategy hands back: the model run through the engine, and the engine-scaled precision."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .policies import PrecisionPolicy

if TYPE_CHECKING:
    from .deepspeed import DeepSpeed


class DeepSpeedModule(nn.Module):
    """What ``prepare`` returns for a model under DeepSpeed: the user's module, run through the engine.

    The engine is built at the first forward; ``parameters()``, ``train()``, ``eval()`` and
    ``state_dict()`` are the user's module's, so code written for the plain model keeps working.
    """

    _strategy: DeepSpeed  # kept out of the module's attributes: the strategy is no part of the model

    def __init__(self, module: nn.Module, strategy: DeepSpeed) -> None:
        super().__init__()
        self.module = module
        self.__dict__["_strategy"] = strategy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._strategy.engine(*args, **kwargs)

    def train(self, mode: bool = True) -> DeepSpeedModule:
        super().train(mode)
        engine = self._strategy._engine
        if engine is not None:
            engine.train(mode)
        return self


class EngineScaledPrecision:
    """The Accelerator's precision policy with loss scaling and the optimizer step left to the engine.

    Autocast and the forward's output casting stay the policy's; the engine scales fp16 losses,
    unscales the gradients and skips overflowing steps itself, so the loss passes through
    unscaled and the step is the engine's. ``optimizer_step`` reports a skipped step, so the
    prepared scheduler does not advance on it.
    """

    scaler = None

    def __init__(self, precision: PrecisionPolicy, strategy: DeepSpeed) -> None:
        self.precision = precision
        self._strategy = strategy

    @property
    def name(self) -> str:
        return self.precision.name

    @property
    def dtype(self) -> torch.dtype | None:
        return self.precision.dtype

    @property
    def is_mixed(self) -> bool:
        return self.precision.is_mixed

    def autocast(self, **kwargs: Any) -> AbstractContextManager[Any]:
        return self.precision.autocast(**kwargs)

    def wrap_forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        return self.precision.wrap_forward(forward)

    def convert_module(self, module: nn.Module) -> nn.Module:
        return self.precision.convert_module(module)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def optimizer_step(self, optimizer: torch.optim.Optimizer, step: Callable[..., Any], **kwargs: Any) -> bool:
        step(**kwargs)
        return self._strategy.last_step_applied

    def state_dict(self) -> dict[str, Any]:
        return {}  # the engine's loss scale is part of the strategy's checkpoint files

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
