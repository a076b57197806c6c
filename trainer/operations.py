"""Operations on nested batches (tensors inside dicts, lists, tuples, dataclasses).

Batches and model outputs come in many shapes; these helpers walk them once and apply a
tensor function to every leaf, keeping the container types (including namedtuples and
``transformers`` ``ModelOutput`` dicts) so user code sees what it put in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from trainer.strategies.nested import find_batch_size, recursively_apply

if TYPE_CHECKING:
    from trainer.strategies import Strategy

__all__ = ["convert_to_fp32", "find_batch_size", "gather", "gather_object", "only_tensors", "recursively_apply",
           "send_to_device"]


def only_tensors(data: Any) -> bool:
    """True when every leaf of a nested structure is a tensor (so all_gather can move it)."""
    leaves: list[bool] = []

    def record(leaf: Any) -> Any:
        leaves.append(torch.is_tensor(leaf))
        return leaf

    recursively_apply(record, data, test=lambda x: not isinstance(x, (list, tuple, Mapping)))
    return bool(leaves) and all(leaves)


def send_to_device(data: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor of a nested batch to ``device``."""
    return recursively_apply(lambda t: t.to(device, non_blocking=non_blocking), data)


def _is_low_float(obj: Any) -> bool:
    return torch.is_tensor(obj) and obj.dtype in (torch.float16, torch.bfloat16)


def convert_to_fp32(data: Any) -> Any:
    """Cast fp16/bf16 tensors of a nested output to fp32 (mixed precision returns fp32 outputs)."""
    return recursively_apply(lambda t: t.float(), data, test=_is_low_float)


def gather(data: Any, strategy: Strategy) -> Any:
    """Concatenate every process's tensors along dim 0, for each tensor of a nested structure."""
    return recursively_apply(strategy.all_gather, data)


def gather_object(obj: Any, strategy: Strategy) -> list[Any]:
    """Every process's picklable object, as a flat list in rank order (lists are concatenated)."""
    gathered = strategy.all_gather_object(obj)
    if isinstance(obj, list):
        return [item for part in gathered for item in part]
    return gathered


def reduce(data: Any, strategy: Strategy, reduction: str = "sum", scale: float = 1.0) -> Any:
    """Reduce every tensor across processes with ``reduction`` (sum, mean, max, min), then scale."""
    if reduction not in ("sum", "mean", "max", "min"):
        raise ValueError(f"reduction={reduction!r} is not one of 'sum', 'mean', 'max', 'min'.")

    def _reduce(tensor: torch.Tensor) -> torch.Tensor:
        result = strategy.all_reduce(tensor, op=reduction)
        return result * scale if scale != 1.0 else result

    return recursively_apply(_reduce, data)


def pad_across_processes(data: Any, strategy: Strategy, dim: int = 0, pad_index: int = 0,
                         pad_first: bool = False) -> Any:
    """Pad every tensor along ``dim`` to the largest size any process has, so they can be gathered."""

    def _pad(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0 or dim >= tensor.dim() or dim < -tensor.dim():
            return tensor
        axis = dim % tensor.dim()
        size = torch.tensor([tensor.shape[axis]], device=tensor.device)
        longest = int(strategy.all_gather(size).max())
        if longest == tensor.shape[axis]:
            return tensor
        shape = list(tensor.shape)
        shape[axis] = longest
        padded = tensor.new_full(shape, pad_index)
        index = [slice(None)] * tensor.dim()
        index[axis] = slice(longest - tensor.shape[axis], longest) if pad_first else slice(0, tensor.shape[axis])
        padded[tuple(index)] = tensor
        return padded

    return recursively_apply(_pad, data)
