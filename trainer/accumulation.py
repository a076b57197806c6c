"""Gradient accumulation: k micro-batches, one optimizer step, the gradient of one big batch.

The policy decides, for every micro-step, whether this backward ends a group (a *boundary*,
where gradients are synchronised and the optimizer steps) and by how much the loss is
divided, so that the accumulated gradient equals the gradient of the whole group:

* ``normalize="mean"`` (default): each micro-batch loss is a mean; it is divided by the number
  of micro-batches in its group. The last group of an epoch may be shorter than ``steps``; when
  the data loader's length is known the divisor is that group's true size, otherwise the
  gradients are rescaled at the boundary.
* ``normalize="tokens"``: each micro-batch loss is a *sum* over its tokens (or items) and
  ``backward(loss, num_tokens=n)`` reports how many it had. At the boundary the gradients are
  divided by the token count of the whole group (over every process), which gives exactly the
  gradient of one big batch even when micro-batches hold different numbers of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from trainer.strategies import Strategy

NORMALIZATIONS = ("mean", "tokens")


class _BatchSource(Protocol):
    """What the policy needs to know of the data loader being iterated."""

    end_of_dataloader: bool

    @property
    def remaining(self) -> int | None: ...


class MicroStep:
    """One micro-step of ``policy``: the context ``accelerator.accumulate`` returns.

    A class, not a generator: it runs on every training step (and the accelerator keeps one per set
    of models). Inside a group (not at its boundary) backward does not synchronise the models' gradients.
    """

    __slots__ = ("models", "policy", "stack", "strategy")

    def __init__(self, policy: GradientAccumulation, strategy: Strategy, models: tuple[nn.Module, ...]) -> None:
        self.policy, self.strategy, self.models = policy, strategy, models
        self.stack: ExitStack | None = None

    def __enter__(self) -> None:
        policy = self.policy
        policy.begin_micro_step()
        if self.models and not (policy.sync_gradients or policy.sync_each_batch):  # should_sync_backward, inlined
            self.stack = stack = ExitStack()
            for model in self.models:
                stack.enter_context(self.strategy.no_backward_sync(model))

    def __exit__(self, *exc_info: Any) -> bool | None:
        stack, self.stack = self.stack, None
        if stack is not None:
            return stack.__exit__(*exc_info)
        return None


class GradientAccumulation:
    """Accumulate ``steps`` micro-batches per optimizer step.

    Args:
        steps: micro-batches per optimizer step.
        normalize: ``"mean"`` or ``"tokens"`` (see the module docstring).
        sync_with_dataloader: the end of the data loader is always a boundary.
        sync_each_batch: synchronise gradients on every micro-step (saves memory under sharded
            strategies at the cost of communication); the optimizer still steps on boundaries.
        adjust_scheduler: a prepared scheduler's ``step()`` on a micro-step inside a group only
            counts the call (Accelerate's behaviour), instead of doing nothing.
    """

    def __init__(self, steps: int = 1, normalize: str = "mean", sync_with_dataloader: bool = True,
                 sync_each_batch: bool = False, adjust_scheduler: bool = True) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be a whole number >= 1, got {steps!r}.")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={normalize!r} is not one of {list(NORMALIZATIONS)}.")
        self.steps = steps
        self.normalize = normalize
        self.sync_with_dataloader = sync_with_dataloader
        self.sync_each_batch = sync_each_batch
        self.adjust_scheduler = adjust_scheduler
        self.micro_step = 0  # micro-steps done in the current group
        self.group_size = steps
        self.sync_gradients = True
        self._dataloaders: list[_BatchSource] = []
        self._tokens: torch.Tensor | float = 0.0
        self._grad_divisor: float | torch.Tensor | None = None

    # -- data loaders tell the policy where they are --------------------------------------------
    def push_dataloader(self, dataloader: _BatchSource) -> None:
        self._dataloaders.append(dataloader)

    def pop_dataloader(self, dataloader: _BatchSource) -> None:
        if dataloader in self._dataloaders:
            self._dataloaders.remove(dataloader)

    @property
    def active_dataloader(self) -> _BatchSource | None:
        return self._dataloaders[-1] if self._dataloaders else None

    @property
    def end_of_dataloader(self) -> bool:
        loader = self.active_dataloader
        return bool(loader is not None and loader.end_of_dataloader)

    # -- one micro-step ---------------------------------------------------------------------------
    def begin_micro_step(self) -> bool:
        """Count a micro-step; return True when its backward ends a group (a boundary)."""
        if self.steps == 1:  # the common case, on every step: every micro-step ends its group
            self.group_size, self.micro_step, self.sync_gradients = 1, 0, True
            return True
        loader = self.active_dataloader
        if self.micro_step == 0:
            remaining = loader.remaining if loader is not None and self.sync_with_dataloader else None
            self.group_size = self.steps if remaining is None else max(1, min(self.steps, remaining + 1))
        self.micro_step += 1
        end = self.sync_with_dataloader and loader is not None and loader.end_of_dataloader
        self.sync_gradients = self.micro_step >= self.group_size or end
        if self.sync_gradients:
            if self.normalize == "mean" and self.micro_step < self.group_size:
                # The group ended early and its size could not be known in advance: each loss was
                # divided by group_size, the gradient must be divided by micro_step instead.
                self._grad_divisor = self.micro_step / self.group_size
            self.micro_step = 0
        return self.sync_gradients

    @property
    def should_sync_backward(self) -> bool:
        """Whether this micro-step's backward must all-reduce gradients."""
        return self.sync_gradients or self.sync_each_batch

    def scale_loss(self, loss: torch.Tensor, num_tokens: Any = None) -> torch.Tensor:
        """The loss to differentiate for this micro-step (divided once, here and nowhere else)."""
        if self.normalize == "tokens":
            if num_tokens is None:
                raise ValueError(
                    "Accumulation normalises by tokens: pass the micro-batch's token count, "
                    "backward(loss, num_tokens=n), with loss summed (not averaged) over those tokens."
                )
            self._tokens = self._tokens + (num_tokens.detach() if torch.is_tensor(num_tokens) else num_tokens)
            return loss
        if num_tokens is not None:
            raise ValueError(
                "backward(num_tokens=...) is for token-normalised accumulation; create the Accelerator "
                "with accumulation_normalize='tokens' (and pass summed losses) to use it."
            )
        return loss / self.group_size if self.group_size != 1 else loss

    def finalize_gradients(self, parameters: Iterable[torch.Tensor], total_tokens: Any = None) -> None:
        """At a boundary, divide the gradients by what the losses were not yet divided by.

        ``total_tokens`` is the token count of the whole group over every process, which the
        caller reduces (the policy holds no process group); only needed in token mode.
        """
        divisor = self._grad_divisor
        if self.normalize == "tokens" and total_tokens is not None:
            divisor = total_tokens
        self._grad_divisor = None
        self._tokens = 0.0
        if divisor is None or float(divisor) == 0:
            return  # no tokens in the whole group: the summed losses were zero, so are the gradients
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, float(divisor))

    @property
    def pending_tokens(self) -> torch.Tensor | float:
        """Tokens counted in the current group on this process."""
        return self._tokens

    @property
    def needs_finalize(self) -> bool:
        return self._grad_divisor is not None or self.normalize == "tokens"

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the current group stands (the checkpoint also holds the gradients accumulated so far)."""
        return {"micro_step": self.micro_step, "group_size": self.group_size,
                "tokens": float(self._tokens), "grad_divisor": None if self._grad_divisor is None
                else float(self._grad_divisor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_step = int(state.get("micro_step", 0))
        self.group_size = int(state.get("group_size", self.steps))
        self._tokens = float(state.get("tokens", 0.0))
        self._grad_divisor = state.get("grad_divisor")
