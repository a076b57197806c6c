"""What ``training_step`` and ``validation_step`` return, read the one way the Trainer reads it."""

from __future__ import annotations

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
    """(loss, num_tokens) from what training_step returned."""
    if torch.is_tensor(outputs):
        return outputs, None
    if isinstance(outputs, Mapping):
        if "loss" not in outputs:
            raise KeyError(f"training_step returned a dict without 'loss' (keys: {sorted(outputs)}).")
        return outputs["loss"], outputs.get("num_tokens")
    raise TypeError(f"training_step must return the loss tensor or a dict with 'loss', got {type(outputs).__name__}.")

