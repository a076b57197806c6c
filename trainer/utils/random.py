"""``synchronize_rng_state(s)``: every process takes process 0's random state (Accelerate's helpers)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from trainer.state import PartialState
from trainer.utils.operations import broadcast_object_list

_DEVICE_TYPES = ("cuda", "xpu", "npu", "mlu", "musa", "hpu", "sdaa", "mps")


def synchronize_rng_state(rng_type: str | None = None, generator: torch.Generator | None = None) -> None:
    """Copy process 0's state of one generator to every process.

    ``rng_type``: ``"torch"`` (the CPU generator), a device type (``"cuda"``, ``"xpu"``...: this
    process's device generator) or ``"generator"`` (``generator``, which must be given).
    """
    kind = str(getattr(rng_type, "value", rng_type))
    if kind == "generator":
        if generator is None:
            raise ValueError("synchronize_rng_state('generator') needs the generator: pass generator=...")
        state = generator.get_state()
    elif kind == "torch":
        state = torch.get_rng_state()
    elif kind in _DEVICE_TYPES:
        module = getattr(torch, kind)
        state = module.get_rng_state()
    elif kind == "xla":
        raise ValueError("synchronize_rng_state('xla'): the XLA strategy seeds its devices itself; use 'torch'.")
    else:
        raise ValueError(f"synchronize_rng_state: unknown rng_type {rng_type!r}; use 'torch', 'generator' or a device "
                         f"type ({', '.join(_DEVICE_TYPES)}).")
    if PartialState().num_processes == 1:
        return
    state = broadcast_object_list([state.cpu()])[0]
    if kind == "generator":
        assert generator is not None
        generator.set_state(state)
    elif kind == "torch":
        torch.set_rng_state(state)
    else:
        getattr(torch, kind).set_rng_state(state)


def synchronize_rng_states(rng_types: Iterable[str], generator: torch.Generator | None = None) -> None:
    """``synchronize_rng_state`` for each of ``rng_types``."""
    for rng_type in rng_types:
        synchronize_rng_state(rng_type, generator=generator)
