"""What the Trainer does when a loss (or the gradient norm) is NaN or infinite.

Each micro-batch's loss is noted on the device (no synchronisation); at the accumulation
boundary, before the optimizer step, one check decides for the whole group, agreed by every
process: ``"error"`` (the default) stops the run before the weights take the step, naming the
step, the value and the newest checkpoint with finite weights; ``"skip"`` drops the group's
step; ``"warn"`` warns and steps anyway.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

ACTIONS = ("error", "skip", "warn")


class NonFiniteLossError(FloatingPointError):
    """A training loss or gradient norm was NaN or infinite (``Trainer(on_nonfinite="error")``)."""


def check_action(action: str) -> str:
    if action not in ACTIONS:
        raise ValueError(f"on_nonfinite={action!r} is not one of {list(ACTIONS)}: 'error' stops the run, 'skip' drops "
                         "the step, 'warn' steps anyway.")
    return action


class NonFiniteGuard:
    """At each accumulation boundary, checks the group's losses and the gradient norm.

    The losses arrive detached, as the Trainer keeps them for logging: on the CPU each is read
    (reading costs nothing there); on an accelerator one read checks the whole group. With
    several processes, ``any_true(flag)`` says whether the flag is set on any of them (one
    collective per step).
    """

    def __init__(self, action: str, any_true: Callable[[bool], bool] | None = None) -> None:
        self.action = check_action(action)
        self._any_true = any_true  # None on one process: the flag is its own answer
        self.skipped_steps = 0

    @staticmethod
    def _bad_loss(losses: list[float | torch.Tensor]) -> float | None:
        """The first non-finite value among ``losses`` (numbers, or one-element tensors on one device), or None."""
        tensors = [loss for loss in losses if isinstance(loss, torch.Tensor)]
        if tensors and not tensors[0].is_cpu:  # read once, after one check on the device
            stacked = torch.stack([loss.reshape(()).float() for loss in tensors])
            if bool(torch.isfinite(stacked).all()):
                return None
            values = stacked.tolist()
        else:
            values = [loss.item() if isinstance(loss, torch.Tensor) else float(loss) for loss in losses]
        return next((value for value in values if not math.isfinite(value)), None)

    def step_allowed(self, losses: list[float | torch.Tensor], grad_norm: torch.Tensor | None, step: int,
                     recovery: Callable[[], str]) -> bool:
        """At a boundary, with the group's losses: True to step. Raises in ``"error"`` mode; False in ``"skip"`` mode.

        ``step`` is the step about to be taken; ``recovery()`` describes the newest usable checkpoint.
        """
        if (len(losses) == 1 and grad_norm is None and self._any_true is None and type(losses[0]) is float
                and math.isfinite(losses[0])):  # the common case, on every step: one finite loss, read on the CPU
            return True
        bad_loss = self._bad_loss(losses)
        norm = float(grad_norm) if grad_norm is not None else 0.0
        nonfinite = bad_loss is not None or not math.isfinite(norm)
        if not (nonfinite if self._any_true is None else self._any_true(nonfinite)):
            return True
        if bad_loss is not None:
            what = f"the training loss is {bad_loss}"
        elif not math.isfinite(norm):
            what = f"the gradient norm is {norm}"
        else:
            what = "the training loss or gradient norm is not finite on another process"
        if self.action == "error":
            raise NonFiniteLossError(
                f"At step {step} {what}; the run stopped before the optimizer step, so the weights are still finite. "
                f"{recovery()} Usual causes: a learning rate too high, a division by zero or log(0) in the loss, "
                "bad input values, fp16 overflow (try bf16). Trainer(on_nonfinite='skip') skips such steps instead, "
                "'warn' only warns."
            )
        if self.action == "warn":
            warnings.warn(f"At step {step} {what}; stepping anyway (on_nonfinite='warn').", RuntimeWarning, stacklevel=3)
            return True
        self.skipped_steps += 1
        warnings.warn(f"At step {step} {what}; this step is skipped (on_nonfinite='skip'; {self.skipped_steps} skipped "
                      "so far).", RuntimeWarning, stacklevel=3)
        return False


def has_nonfinite_parameters(module: torch.nn.Module) -> torch.Tensor:
    """A device flag: whether any of this process's parameter values (its shards) is NaN or infinite."""
    flags = [(~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p)).any()
             for p in module.parameters() if not p.is_meta and p.numel()]
    return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool)
