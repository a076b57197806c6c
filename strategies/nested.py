"""Nested batches and outputs (tensors inside lists, tuples, named tuples, mappings, dataclasses).

The lowest layer's helpers: strategies walk batches with them (the pipeline's micro-batches and
stage outputs), and the rest of the package reaches them through ``trainer.operations``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def recursively_apply(func: Callable[[torch.Tensor], Any], data: Any,
                      test: Callable[[Any], bool] = torch.is_tensor) -> Any:
    """Apply ``func`` to every leaf for which ``test`` holds; other leaves are returned as they are."""
    if test(data):
        return func(data)
    if isinstance(data, (list, tuple)):
        applied = [recursively_apply(func, item, test) for item in data]
        if _is_namedtuple(data):
            return type(data)(*applied)
        return type(data)(applied) if isinstance(data, tuple) else applied
    if isinstance(data, Mapping):
        mapped = {key: recursively_apply(func, value, test) for key, value in data.items()}
        try:
            return cast(Callable[[dict], Any], type(data))(mapped)  # the same kind of mapping
        except TypeError:
            return mapped
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {f.name: recursively_apply(func, getattr(data, f.name), test)
                   for f in dataclasses.fields(data) if f.init}
        return dataclasses.replace(data, **changes)
    return data


def find_batch_size(data: Any) -> int | None:
    """The length of the first tensor's first dimension in a nested batch."""
    found: list[int] = []

    def record(tensor: torch.Tensor) -> torch.Tensor:
        if not found and tensor.dim():
            found.append(tensor.shape[0])
        return tensor

    recursively_apply(record, data)
    return found[0] if found else None
