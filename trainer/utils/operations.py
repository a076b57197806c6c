"""``trainer.utils.operations``: Accelerate's module-level operations on nested tensors and across processes.

The nested-structure helpers are ``trainer.operations``'; the collectives (``gather``,
``gather_object``, ``broadcast``, ``broadcast_object_list``, ``reduce``, ``pad_across_processes``)
run over every process of the job, as ``PartialState`` knows it, through the base ``Strategy``'s
torch.distributed calls, so they work in a script that holds no Accelerator. On one process each
is the identity (``gather`` still stacks 0-d tensors into one row).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from trainer import operations
from trainer.operations import convert_to_fp32, find_batch_size
from trainer.operations import recursively_apply as _apply
from trainer.state import PartialState
from trainer.strategies import Strategy

__all__ = [
    "CannotPadNestedTensorWarning", "ConvertOutputsToFp32", "DistributedOperationException", "TensorInformation", "broadcast",
    "broadcast_object_list", "concatenate", "convert_outputs_to_fp32", "convert_to_fp32", "copy_tensor_to_devices",
    "find_batch_size", "find_device", "gather", "gather_object", "get_data_structure", "get_shape", "honor_type",
    "ignorant_find_batch_size", "initialize_tensors", "is_namedtuple", "is_tensor_information", "is_torch_tensor", "listify",
    "pad_across_processes", "pad_input_tensors", "recursively_apply", "reduce", "send_to_device", "slice_tensors",
]


class DistributedOperationException(Exception):
    """A collective whose inputs disagree across processes (shapes that cannot be gathered, for instance)."""


class CannotPadNestedTensorWarning(UserWarning):
    """``pad_across_processes`` met a nested tensor, which cannot be padded: it is returned as it is."""


class TensorInformation:
    """A tensor's shape and dtype without its data (what ``get_data_structure`` returns)."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype

    def __repr__(self) -> str:
        return f"TensorInformation(shape={tuple(self.shape)}, dtype={self.dtype})"


def _world() -> Strategy:
    """The base strategy over every process of the job: torch.distributed's world group."""
    state = PartialState()
    world = Strategy()
    world.setup_environment(state.device, state.process_index, state.num_processes)
    return world


def is_torch_tensor(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor)


def is_tensor_information(info: Any) -> bool:
    return isinstance(info, TensorInformation)


def is_namedtuple(data: Any) -> bool:
    return isinstance(data, tuple) and hasattr(data, "_fields")


def honor_type(obj: Any, generator: Any) -> Any:
    """A container of ``obj``'s type (namedtuples included) holding what ``generator`` yields."""
    return type(obj)(*list(generator)) if is_namedtuple(obj) else type(obj)(generator)


def recursively_apply(func: Callable[..., Any], data: Any, *args: Any, test_type: Callable[[Any], bool] = is_torch_tensor,
                      error_on_other_type: bool = False, **kwargs: Any) -> Any:
    """``func(leaf, *args, **kwargs)`` for every leaf of a nested structure that ``test_type`` accepts."""
    if error_on_other_type:
        def check(leaf: Any) -> bool:
            if not test_type(leaf) and not isinstance(leaf, (list, tuple, Mapping)):
                raise TypeError(f"Unsupported type {type(leaf).__name__} passed to {getattr(func, '__name__', func)}: "
                                "only nested lists, tuples and dicts of tensors are.")
            return test_type(leaf)
        return _apply(lambda leaf: func(leaf, *args, **kwargs), data, test=check)
    return _apply(lambda leaf: func(leaf, *args, **kwargs), data, test=test_type)


def send_to_device(tensor: Any, device: torch.device | str | int, non_blocking: bool = False,
                   skip_keys: str | Sequence[str] | None = None) -> Any:
    """Every tensor of a nested structure on ``device``; the values of dict keys in ``skip_keys`` stay where they are."""
    if skip_keys is not None and isinstance(tensor, Mapping):
        skipped = {skip_keys} if isinstance(skip_keys, str) else set(skip_keys)
        moved = {k: v if k in skipped else send_to_device(v, device, non_blocking) for k, v in tensor.items()}
        try:
            return type(tensor)(moved)  # type: ignore[call-arg]
        except TypeError:
            return moved
    return operations.send_to_device(tensor, torch.device(device) if not isinstance(device, torch.device) else device,
                                     non_blocking)


def get_data_structure(data: Any) -> Any:
    """The structure of ``data`` with every tensor replaced by its ``TensorInformation``."""
    return _apply(lambda t: TensorInformation(shape=t.shape, dtype=t.dtype), data)


def get_shape(data: Any) -> Any:
    """The structure of ``data`` with every tensor replaced by its shape as a list."""
    return _apply(lambda t: list(t.shape), data)


def initialize_tensors(data_structure: Any) -> Any:
    """Empty tensors shaped as the ``TensorInformation`` leaves say."""
    return _apply(lambda info: torch.empty(info.shape, dtype=info.dtype), data_structure, test=is_tensor_information)


def ignorant_find_batch_size(data: Any) -> int | None:
    """``find_batch_size``, or None where ``data`` holds no tensor with a dimension."""
    try:
        return find_batch_size(data)
    except (ValueError, TypeError):
        return None


def listify(data: Any) -> Any:
    """Every tensor of a nested structure as (nested) Python lists."""
    return _apply(lambda t: t.tolist(), data)


def find_device(data: Any) -> torch.device | None:
    """The device of the first tensor in a nested structure."""
    found: list[torch.device] = []

    def record(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor.device)
        return tensor

    _apply(record, data)
    return found[0] if found else None


def slice_tensors(data: Any, tensor_slice: slice, process_index: int | None = None,
                  num_processes: int | None = None) -> Any:
    """``tensor[tensor_slice]`` for every tensor of a nested structure."""
    return _apply(lambda t: t[tensor_slice], data)


def concatenate(data: Sequence[Any], dim: int = 0) -> Any:
    """One structure from a list of same-shaped structures, their tensors concatenated along ``dim``."""
    first = data[0]
    if isinstance(first, (tuple, list)):
        return honor_type(first, (concatenate([d[i] for d in data], dim=dim) for i in range(len(first))))
    if isinstance(first, Mapping):
        return type(first)({k: concatenate([d[k] for d in data], dim=dim) for k in first})  # type: ignore[call-arg]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"concatenate can only join nested lists, tuples or dicts of tensors, got {type(first).__name__}.")
    return torch.cat(list(data), dim=dim)


def gather(tensor: Any) -> Any:
    """Every process's tensors, concatenated along dim 0 (for each tensor of a nested structure)."""
    return operations.gather(tensor, _world())


def gather_object(object: Any) -> list[Any]:  # noqa: A002 - Accelerate's argument name
    """Every process's picklable object in process order (lists are concatenated)."""
    return operations.gather_object(object, _world())


def broadcast(tensor: Any, from_process: int = 0) -> Any:
    """Every tensor of a nested structure replaced, in place, by process ``from_process``'s."""
    world = _world()
    return _apply(lambda t: world.broadcast(t, src=from_process), tensor)


def broadcast_object_list(object_list: list[Any], from_process: int = 0) -> list[Any]:
    """``object_list`` filled, in place, with process ``from_process``'s objects."""
    world = _world()
    if world.is_distributed:
        torch.distributed.broadcast_object_list(object_list, src=from_process)
    return object_list


def copy_tensor_to_devices(tensor: torch.Tensor | None = None) -> torch.Tensor:
    """Process 0's tensor on every process, where the others do not know its shape or dtype (they pass None)."""
    world = _world()
    info = world.broadcast_object(None if tensor is None else (tuple(tensor.shape), tensor.dtype))
    if info is None:
        raise ValueError("copy_tensor_to_devices: process 0 passed no tensor.")
    shape, dtype = info
    target = tensor.to(world.root_device) if tensor is not None and world.process_index == 0 else \
        torch.empty(shape, dtype=dtype, device=world.root_device)
    return world.broadcast(target, src=0)


def reduce(tensor: Any, reduction: str = "mean", scale: float = 1.0) -> Any:
    """Every tensor reduced across processes (``"mean"``, ``"sum"``, ``"max"``, ``"min"``), then scaled."""
    return operations.reduce(tensor, _world(), reduction, scale)


def pad_across_processes(tensor: Any, dim: int = 0, pad_index: int = 0, pad_first: bool = False) -> Any:
    """Every tensor padded along ``dim`` to the largest size any process has, so they can be gathered."""
    if isinstance(tensor, torch.Tensor) and tensor.is_nested:
        warnings.warn("pad_across_processes cannot pad a nested tensor; it is returned as it is.",
                      CannotPadNestedTensorWarning, stacklevel=2)
        return tensor
    return operations.pad_across_processes(tensor, _world(), dim, pad_index, pad_first)


def pad_input_tensors(tensor: Any, batch_size: int, num_processes: int, dim: int = 0) -> Any:
    """Pad a batch along ``dim`` (repeating its last item) so ``num_processes`` can split it evenly."""
    remainder = batch_size % num_processes
    if remainder == 0:
        return tensor
    missing = num_processes - remainder

    def pad(t: torch.Tensor) -> torch.Tensor:
        if t.dim() <= dim or t.shape[dim] != batch_size:
            return t
        last = t.narrow(dim, batch_size - 1, 1)
        return torch.cat([t, *[last] * missing], dim=dim)

    return _apply(pad, tensor)


class ConvertOutputsToFp32:
    """A forward whose fp16/bf16 outputs come back as fp32 (picklable, unlike a closure)."""

    def __init__(self, model_forward: Callable[..., Any]) -> None:
        self.model_forward = model_forward
        functools.update_wrapper(self, model_forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return convert_to_fp32(self.model_forward(*args, **kwargs))


def convert_outputs_to_fp32(model_forward: Callable[..., Any]) -> Callable[..., Any]:
    """``model_forward`` with its fp16/bf16 outputs converted to fp32."""
    return ConvertOutputsToFp32(model_forward)
