"""What ``training_step`` and ``validation_step`` return, read the one way the Trainer reads it."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch


def loss_of(output: Any) -> Any:
    """The loss in a model's output: ``.loss``, ``["loss"]``, or the output itself if it is a scalar."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and torch.is_tensor(output) and output.numel() == 1:
        loss = output
    if loss is None:
        raise TypeError(
            f"The model returned a {type(output).__name__} without a loss. Either give the model a "
            "loss (outputs with .loss, like transformers models with labels) or subclass Trainer and "
            "define training_step(self, batch) returning the loss."
        )
    return loss


def unpack_loss(outputs: Any) -> tuple[torch.Tensor, Any]:
    """(loss, num_tokens) from what training_step returned; anything else is one error naming training_step."""
    if type(outputs) is torch.Tensor and outputs.numel() == 1:  # the common case, on every step
        return outputs, None
    if isinstance(outputs, Mapping):
        if "loss" not in outputs:
            raise ValueError(f"training_step returned a dict without 'loss' (keys: {sorted(map(str, outputs))}): put "
                             "the loss to minimise under 'loss' (and, for token-normalised losses, 'num_tokens').")
        loss, num_tokens = outputs["loss"], outputs.get("num_tokens")
    else:
        loss, num_tokens = outputs, None
    if not torch.is_tensor(loss):
        raise TypeError(f"training_step must return the loss tensor or a dict with 'loss', got "
                        f"{type(loss).__name__}{' (did it forget to return the loss?)' if loss is None else ''}: "
                        "return the scalar tensor that backward() should start from.")
    if loss.numel() != 1:
        raise ValueError(f"training_step returned a loss of shape {tuple(loss.shape)}; backward() needs a single "
                         "number: reduce it first (loss.mean(), or reduction='mean' in the loss function).")
    return loss, num_tokens


def loss_record(loss: torch.Tensor) -> float | torch.Tensor:
    """How a micro-batch's loss is kept until its group is checked and logged: on the CPU its number (reading
    it there costs less than keeping a tensor), elsewhere the detached tensor (read only when needed, so no
    synchronisation per step)."""
    return loss.item() if loss.is_cpu else loss.detach()


def mean_loss(records: list[Any]) -> float | torch.Tensor:
    """The mean of a group's ``loss_record`` values (all numbers, or all tensors on one device)."""
    if len(records) == 1:
        return records[0]
    if isinstance(records[0], float):
        return sum(records) / len(records)
    return torch.stack(records).float().mean()


def optimizers_of(configured: Any, scheduler: Any) -> tuple[torch.optim.Optimizer, Any, dict[str, Any]]:
    """(optimizer, scheduler, how to step it) from what ``configure_optimizers`` (or ``optimizer=``) gave.

    The forms: an optimizer; ``(optimizer, scheduler)``; Lightning's ``([optimizer], [scheduler])``
    and ``{"optimizer": o, "lr_scheduler": s, "monitor": m}``, where ``s`` may be a scheduler config dict.
    """
    from trainer.scheduling import check_plateau, scheduler_config

    monitor = None
    if isinstance(configured, Mapping):
        unknown = set(configured) - {"optimizer", "lr_scheduler", "monitor"}
        if "optimizer" not in configured or unknown:
            raise ValueError(f"configure_optimizers returned a dict with the keys {sorted(configured)}: use 'optimizer' "
                             "and optionally 'lr_scheduler' and 'monitor'.")
        optimizer, scheduler = configured["optimizer"], configured.get("lr_scheduler", scheduler)
        monitor = configured.get("monitor")
    elif isinstance(configured, (tuple, list)):
        optimizer, scheduler = configured[0], configured[1] if len(configured) > 1 else scheduler
        if isinstance(optimizer, (tuple, list)) or isinstance(scheduler, (tuple, list)):  # ([optimizer], [scheduler])
            optimizers, schedulers = list(optimizer), list(scheduler or [])
            if len(optimizers) != 1 or len(schedulers) > 1:
                raise ValueError(f"configure_optimizers returned {len(optimizers)} optimizers and {len(schedulers)} "
                                 "schedulers: the Trainer steps one optimizer (and one scheduler).")
            optimizer, scheduler = optimizers[0], schedulers[0] if schedulers else None
    else:
        optimizer = configured
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"configure_optimizers must return an optimizer or (optimizer, scheduler), "
                        f"got {type(optimizer).__name__}.")
    scheduler, plan = scheduler_config(scheduler, monitor) if scheduler is not None else (None, {})
    if scheduler is not None:
        check_plateau(scheduler, plan["monitor"])
    return optimizer, scheduler, plan


def call_model(model: torch.nn.Module, inner: torch.nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: a dict as keyword arguments, a tuple or list as positional ones.

    When the call fails because ``inner.forward`` does not take such arguments, the error says
    so and names ``training_step`` (the place to unpack the batch yourself).
    """
    args, kwargs = ((), dict(batch)) if isinstance(batch, Mapping) else \
        (tuple(batch), {}) if isinstance(batch, (tuple, list)) else ((batch,), {})
    try:
        return model(*args, **kwargs)
    except TypeError as error:
        try:
            inspect.signature(inner.forward).bind(*args, **kwargs)
        except TypeError as mismatch:
            given = f"keys {sorted(kwargs)}" if kwargs else f"{len(args)} positional value(s)"
            raise TypeError(
                f"The Trainer's default training_step called {type(inner).__name__}.forward with the batch's "
                f"{given}, and forward{inspect.signature(inner.forward)} does not take them ({mismatch}). Subclass "
                "Trainer and define training_step(self, batch) (and validation_step) to unpack the batch and compute "
                "the loss yourself."
            ) from error
        raise
