"""Model-size and tensor-placement helpers under Accelerate's names, over ``trainer.inference``'s own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from trainer.inference import find_tied_parameters, get_max_memory, infer_auto_device_map
from trainer.inference.device_map import check_device_map
from trainer.inference.dispatch import loaded_dtype
from trainer.inference.hooks import set_tensor
from trainer.inference.load_in_model import load_checkpoint_in_model  # noqa: F401  (Accelerate's home of it)
from trainer.inference.sizes import as_dtype, dtype_size, module_sizes, parse_size


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``inference.sizes.as_dtype``: a dtype, its name or Accelerate's ``"torch.float16"`` spelling."""
    return as_dtype(dtype)


def dtype_byte_size(dtype: torch.dtype) -> float:
    """Bytes per element of ``dtype`` (fractions for sub-byte types)."""
    return dtype_size(dtype)


def convert_file_size_to_int(size: int | str) -> int:
    """Bytes from ``"5GB"`` (10**9), ``"5GiB"`` (2**30), ``"500MB"``... or an int."""
    return parse_size(size)


def compute_module_sizes(model: nn.Module, dtype: torch.dtype | str | None = None, special_dtypes: Any = None,
                         buffers_only: bool = False) -> dict[str, int]:
    """Bytes under every module name (``""`` is the whole model), tied weights once, in ``dtype`` if given."""
    if special_dtypes or buffers_only:
        raise ValueError("compute_module_sizes(special_dtypes=..., buffers_only=True) are not available; size the "
                         "model with trainer.inference.module_sizes(model, dtype) or `trainer estimate-memory`.")
    return module_sizes(model, _dtype(dtype))


def named_module_tensors(module: nn.Module, include_buffers: bool = True, recurse: bool = False,
                         remove_non_persistent: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's parameters (and buffers), its own only unless ``recurse``."""
    yield from module.named_parameters(recurse=recurse)
    if include_buffers:
        persistent: set[str] | None = None
        if remove_non_persistent:
            persistent = {name for name, _ in module.named_buffers(recurse=recurse)} - {
                f"{prefix}{'.' if prefix else ''}{name}" for prefix, sub in module.named_modules()
                for name in sub._non_persistent_buffers_set}
        for name, buffer in module.named_buffers(recurse=recurse):
            if persistent is None or name in persistent:
                yield name, buffer


def set_module_tensor_to_device(module: nn.Module, tensor_name: str, device: int | str | torch.device,
                                value: torch.Tensor | None = None, dtype: torch.dtype | str | None = None,
                                **kwargs: Any) -> None:
    """Put ``value`` (or the tensor already there) under ``tensor_name`` on ``device``.

    The value takes the tensor's own dtype, or ``dtype`` when given (floating values only), as Accelerate's does.
    """
    current = module.get_parameter(tensor_name) if tensor_name in dict(module.named_parameters()) else \
        module.get_buffer(tensor_name)
    if value is None:
        if current.device.type == "meta":
            raise ValueError(f"set_module_tensor_to_device: {tensor_name!r} is on the meta device; pass its value=.")
        value = current
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(f"set_module_tensor_to_device: {tensor_name!r} has shape {tuple(current.shape)} and the value "
                         f"given has {tuple(value.shape)}; pass a value of the tensor's shape (from the matching checkpoint).")
    moved = value.to(device=device, dtype=loaded_dtype(value.dtype, current.dtype, _dtype(dtype)))
    if isinstance(current, nn.Parameter):
        set_tensor(module, tensor_name, nn.Parameter(moved, requires_grad=current.requires_grad))
    else:
        set_tensor(module, tensor_name, moved)


def load_state_dict(checkpoint_file: str | os.PathLike, device_map: Any = None) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors on the CPU (safetensors, or torch-saved tensors only)."""
    if device_map is not None:
        raise ValueError("load_state_dict(device_map=...) is not available; load into a model with "
                         "load_checkpoint_and_dispatch(model, checkpoint, device_map=...).")
    path = os.fspath(checkpoint_file)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


__all__ = ["check_device_map", "compute_module_sizes", "convert_file_size_to_int", "dtype_byte_size",
           "find_tied_parameters", "get_max_memory", "infer_auto_device_map", "load_state_dict", "named_module_tensors",
           "set_module_tensor_to_device"]


def normalize_device(device: Any) -> Any:
    """A device as torch takes it: a bare index becomes ``"<type>:<index>"`` on accelerators other than CUDA (whose
    bare indices torch reads itself), ``"npu"`` becomes ``"npu:0"``; anything else is returned as it is."""
    from trainer.utils.environment import get_torch_accelerator_backend

    if device == "npu":
        return "npu:0"
    if isinstance(device, int) and not isinstance(device, bool):
        kind, _ = get_torch_accelerator_backend(check_available=False)
        if kind == "hpu":
            return "hpu"
        if kind not in (None, "cuda"):
            return f"{kind}:{device}"
    return device


def get_model_tp_size(model: Any) -> int | None:
    """The tensor-parallel degree a ``transformers`` model was loaded with (``tp_size`` on the model, or in its
    config's ``distributed_config``), or None when it was not split."""
    size = getattr(model, "tp_size", None)
    if size is not None:
        return size
    config = getattr(getattr(model, "config", None), "distributed_config", None)
    return config.get("tp_size") if isinstance(config, dict) else getattr(config, "tp_size", None)
