"""``Inferencer``: run a model larger than any one device, with its weights spread by a device map.

It builds on the pieces of ``trainer.inference``: the device map (accelerators, then CPU, then
disk, within ``max_memory``), loading a checkpoint shard by shard, and hooks that bring
offloaded layers in as they run, read ahead by ``prefetch`` layers. ``Trainer.predict`` uses it
when given a ``device_map``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from trainer.inference.device_map import Device, no_split_classes, resolve_device_map
from trainer.inference.dispatch import (
    dispatch_model,
    dispatch_of,
    load_checkpoint_and_dispatch,
    main_device,
    remove_dispatch,
)
from trainer.inference.hooks import set_tensor
from trainer.inference.outputs import save_outputs
from trainer.inference.sizes import as_dtype
from trainer.operations import send_to_device


class Inferencer:
    """A dispatched model, ready to run, predict over data, or generate.

    Args:
        model: an ``nn.Module``: built with ``init_empty_weights`` when ``checkpoint`` is given,
            or with real weights (which are then placed and offloaded as the map says).
        checkpoint: a safetensors file, a sharded folder with an index JSON, or a ``.bin`` file.
        device_map: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, a device, or
            a dict ``{module name: device}`` (devices: accelerator index, ``"cpu"``, ``"disk"``).
        max_memory: ``{device: bytes or "2GiB"}``; default: 90% of what each device has free.
        no_split_module_classes: class names never divided between devices (default: a transformers
            model's ``_no_split_modules``).
        offload_folder: where weights for the disk are written when they cannot be read from the
            checkpoint as they are.
        dtype: convert floating weights while loading (e.g. ``torch.bfloat16``).
        prefetch: offloaded layers read ahead of the running one (0: none).
        keep_weights: for a model that came with real weights, keep its own parameter objects so
            ``close()`` puts them back exactly as they were (an optimizer holding them goes on
            working); they stay in memory meanwhile.
        quantization: a ``QuantizationConfig`` (or its keyword arguments as a dict, or a transformers
            ``BitsAndBytesConfig``): linear layers become bitsandbytes 8-bit or 4-bit layers, quantized as
            the checkpoint is read (see ``trainer.inference.quantization``).
    """

    def __init__(self, model: nn.Module, checkpoint: str | os.PathLike | None = None, *, device_map: Any = "auto",
                 max_memory: Mapping[Device, int | str] | None = None, no_split_module_classes: Iterable[str] | None = None,
                 offload_folder: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None, prefetch: int = 1,
                 strict: bool = True, keep_weights: bool = False, quantization: Any = None) -> None:
        self._kept: dict[str, torch.Tensor] | None = None
        if checkpoint is not None:
            self.model = load_checkpoint_and_dispatch(model, checkpoint, device_map, max_memory, no_split_module_classes,
                                                      offload_folder, dtype, strict, prefetch, quantization)
        else:
            dtype = as_dtype(dtype)
            if dtype is not None:
                model.to(dtype)
            if keep_weights:
                self._kept = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
            resolved = resolve_device_map(model, device_map, max_memory, no_split_classes(model, no_split_module_classes))
            if quantization is not None:
                from trainer.inference.quantization import check_quantized_placement, quantize_model

                model = quantize_model(model, quantization, device_map=resolved)
                check_quantized_placement(model, resolved, main_device(resolved))
            self.model = dispatch_model(model, resolved, offload_folder=offload_folder, prefetch=prefetch)
        self.device_map: dict[str, Device] = vars(self.model)["hf_device_map"]
        self.device = main_device(self.device_map)

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*send_to_device(args, self.device), **send_to_device(kwargs, self.device))

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """A transformers model's ``generate``, with its inputs on the execution device."""
        generate = cast(Callable[..., Any], self.model.generate)  # a transformers model's
        return generate(*send_to_device(args, self.device), **send_to_device(kwargs, self.device))

    def predict(self, data: Any, batch_size: int = 8, collate_fn: Callable | None = None,
                step: Callable[[nn.Module, Any], Any] | None = None, stream: bool = False,
                output_dir: str | os.PathLike | None = None) -> list[Any] | Iterator[Any]:
        """Outputs for every batch of ``data`` (a Dataset or DataLoader), in order.

        ``step(model, batch)`` computes a batch's outputs (default: the model called with the
        batch). ``stream=True`` yields them as they come; ``output_dir`` writes each batch to
        ``batch_<i>.safetensors`` there and gives the file paths instead of the outputs.
        """
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)
        results = self._predict(loader, step or call_model, output_dir)
        return results if stream else list(results)

    def _predict(self, loader: DataLoader, step: Callable[[nn.Module, Any], Any],
                 output_dir: str | os.PathLike | None) -> Iterator[Any]:
        for index, batch in enumerate(loader):
            with torch.no_grad():
                outputs = step(self.model, send_to_device(batch, self.device))
            yield save_outputs(outputs, output_dir, index) if output_dir is not None else outputs

    def closing_after(self, iterator: Iterator[Any]) -> Iterator[Any]:
        """Yield from ``iterator``, then ``close`` (also when the caller stops early)."""
        try:
            yield from iterator
        finally:
            self.close()

    def close(self) -> None:
        """Take the hooks off; with ``keep_weights``, the model's own parameters and buffers go back in place."""
        if dispatch_of(self.model) is None:
            return
        remove_dispatch(self.model)
        if self._kept is not None:
            for name, tensor in self._kept.items():
                set_tensor(self.model, name, tensor)
            self._kept = None
        vars(self.model).pop("hf_device_map", None)

    def __enter__(self) -> Inferencer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def call_model(model: nn.Module, batch: Any) -> Any:
    """A dict batch as keyword arguments, a tuple or list as positional ones, anything else as one argument."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
