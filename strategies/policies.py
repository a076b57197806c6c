"""The run's policies as a strategy sees them: typed protocols, so strategies need not know where the policies live.

The Accelerator builds a precision policy (``trainer.precision``) and an accumulation policy
(``trainer.accumulation``) and hands both to ``Strategy.setup_policies``. A strategy reads them
through these protocols only; a strategy whose engine does part of a policy's work (DeepSpeed
scales fp16 losses itself) returns a policy of its own that implements ``PrecisionPolicy``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn


class PrecisionPolicy(Protocol):
    """How the forward pass is cast, and how the loss and the optimizer step are handled."""

    @property
    def name(self) -> str:
        """The canonical precision name (``"no"``, ``"fp16"``, ``"bf16"``, ``"fp8"``)."""
        ...

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype the forward pass computes in, or None for full fp32."""
        ...

    @property
    def is_mixed(self) -> bool:
        """Whether the forward pass runs under autocast (parameters stay fp32)."""
        ...

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler, when the policy has one."""
        ...

    def autocast(self, **kwargs: Any) -> AbstractContextManager[Any]:
        """The context the forward pass runs in."""
        ...

    def wrap_forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """The module's forward as the training loop should call it."""
        ...

    def convert_module(self, module: nn.Module) -> nn.Module:
        """The module with its layers converted for the policy (fp8 swaps its linear layers)."""
        ...

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss that backward should start from."""
        ...

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the optimizer's gradients to their true scale."""
        ...

    def optimizer_step(self, optimizer: torch.optim.Optimizer, step: Callable[..., Any], **kwargs: Any) -> bool:
        """Run ``step``; return False when the step was skipped."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the policy keeps in checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        ...


class AccumulationPolicy(Protocol):
    """When the optimizer steps: after ``steps`` micro-batches, each loss divided as ``normalize`` says."""

    @property
    def steps(self) -> int:
        """Micro-batches per optimizer step."""
        ...

    @property
    def normalize(self) -> str:
        """``"mean"`` (each micro-batch loss divided by ``steps``) or ``"tokens"`` (by the group's token count)."""
        ...
