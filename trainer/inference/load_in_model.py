"""``load_checkpoint_in_model``: a checkpoint's weights into a model that is already built, where it lies.

Accelerate's function, without its offloading (a ``"disk"`` entry in the device map, an offload
folder: that is ``load_checkpoint_and_dispatch``'s job here). Each weight goes to the device the
device map gives its module, else to where the model's tensor already is (the CPU for a tensor on
the meta device). A tensor already in place on that device, in the dtype it keeps, is copied into:
the Parameter objects stay the same, so an optimizer built on them still holds them. Tied weights
stored once fill every name tied to them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from trainer.checkpoint_errors import CheckpointError
from trainer.inference.checkpoint_files import CheckpointFiles, check_against_model
from trainer.inference.checkpoint_shards import listing
from trainer.inference.device_map import DeviceMapError, device_for, torch_device
from trainer.inference.dispatch import aliases_of, loaded_dtype, place, saved_once
from trainer.inference.hooks import get_tensor
from trainer.inference.quantization import matches_modules
from trainer.inference.sizes import as_dtype

_OFFLOAD = ("offloading is load_checkpoint_and_dispatch's job here: load_checkpoint_and_dispatch(model, checkpoint, "
            "device_map=..., offload_folder=...)")


def _device_for(name: str, device_map: Mapping[str, Any] | None, current: torch.Tensor) -> torch.device:
    """Where tensor ``name`` goes: the device map's device for it, else where the model's tensor is (the CPU for meta)."""
    if device_map:
        with contextlib.suppress(DeviceMapError):  # an entry covers it, or the tensor stays where it is
            return torch_device(device_for(name, device_map))
    return torch.device("cpu") if current.device.type == "meta" else current.device


def load_checkpoint_in_model(model: nn.Module, checkpoint: str | os.PathLike, device_map: Mapping[str, Any] | None = None,
                             offload_folder: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
                             offload_state_dict: bool = False, offload_buffers: bool = False,
                             keep_in_fp32_modules: Iterable[str] | None = None, offload_8bit_and_4bit: bool = False,
                             strict: bool = False, full_state_dict: bool = True, broadcast_from_rank0: bool = False) -> None:
    """Load ``checkpoint`` (a safetensors or ``.bin`` file, or a folder of shards with its index) into ``model``.

    Shapes that differ are one error listing them, before anything is loaded. Keys only in the
    checkpoint, or only in the model, are an error with ``strict`` and a warning without (the
    model's own values stay). ``dtype`` casts floating weights, except in ``keep_in_fp32_modules``.
    """
    if offload_folder is not None or offload_state_dict or offload_buffers or offload_8bit_and_4bit or (
            device_map and "disk" in {str(device) for device in device_map.values()}):
        raise NotImplementedError(f"load_checkpoint_in_model with offloading: {_OFFLOAD}.")
    if not full_state_dict or broadcast_from_rank0:
        raise NotImplementedError("load_checkpoint_in_model(full_state_dict=False / broadcast_from_rank0=True) is for "
                                  "FSDP-sharded models: load them with accelerator.load_state(), or load the full "
                                  "weights before accelerator.prepare(model).")
    files = CheckpointFiles(checkpoint)
    aliases = aliases_of(model)
    stored = set(files.names())
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict(keep_vars=True).items()}
    try:
        missing, unexpected = check_against_model(files, shapes, strict=strict, ignore=saved_once(aliases, stored),
                                                  missing_ok=not strict)
    except CheckpointError as error:
        if error.mismatched:
            raise
        raise CheckpointError(f"{error} (or pass strict=False to load the keys both have)") from None
    if missing or unexpected:
        warnings.warn(f"load_checkpoint_in_model: {len(missing)} key(s) of the model are not in {files.path} (they keep "
                      f"their values): {listing(missing)}; {len(unexpected)} key(s) of the checkpoint are not in the "
                      f"model (left out): {listing(unexpected)}.", UserWarning, stacklevel=2)
    cast, fp32 = as_dtype(dtype), tuple(keep_in_fp32_modules or ())
    for name in sorted(stored & set(shapes)):
        current = get_tensor(model, name)
        device = _device_for(name, device_map, current)
        target = loaded_dtype(files.dtype(name), current.dtype, None if matches_modules(name, fp32) else cast)
        value = files.get_tensor(name)
        if current.device == device and current.dtype == target and current.device.type != "meta":
            with torch.no_grad():
                current.copy_(value)  # the same Parameter: an optimizer built on the model keeps it
        else:
            place(model, name, value.to(device=device, dtype=target), aliases)
