"""Build models without memory: parameters (and optionally buffers) on the meta device.

A model built inside ``init_empty_weights()`` has the right structure, names, shapes and dtypes,
and takes no memory; its weights are filled later from a checkpoint, layer by layer, onto the
devices a device map chooses. ``init_on_device(device)`` builds directly on a given device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def init_on_device(device: torch.device | str, include_buffers: bool = False) -> Iterator[None]:
    """Create every parameter registered inside the block on ``device`` (and buffers, if asked).

    With ``include_buffers=True`` this is torch's own ``with torch.device(device):``, which places
    every tensor created in the block. Without it, only parameters move: buffers (position ids,
    rotary tables) are usually computed at construction and are small, so they stay real.
    """
    device = torch.device(device)
    if include_buffers:
        with device:
            yield
        return
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device != device:  # already there (a tied weight): keep the same object
            kwargs = param.__dict__  # keeps attributes a library attached to the parameter
            moved = nn.Parameter(param.to(device), requires_grad=param.requires_grad)
            moved.__dict__.update(kwargs)
            module._parameters[name] = moved

    # Patched while the block runs, so that every module built in it places its parameters on ``device``.
    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Build models on the meta device: no memory is allocated for their parameters.

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    """
    with init_on_device("meta", include_buffers=include_buffers):
        yield
