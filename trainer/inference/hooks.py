"""Hooks that give an offloaded module its weights just before it runs and take them back after.

An offloaded module holds meta placeholders. Its forward pre-hook puts the real tensors (read
from CPU memory or disk by the ``OffloadedWeights``) on the execution device; its forward hook
puts the placeholders back, so the memory is freed as soon as the layer is done.

Prefetch: while layer i runs, the next ``prefetch`` layers' weights are already being read by
a background thread (disk reads and copies release the GIL, so they overlap with compute), and
on an accelerator copied to it on a side stream. At most ``prefetch`` layers are in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from trainer.inference.offload import OffloadedWeights
from trainer.operations import send_to_device


class OffloadedModule:
    """One offloaded module: which of its tensors to bring, from where, to which device."""

    def __init__(self, module: nn.Module, tensors: dict[str, str], weights: OffloadedWeights, device: torch.device) -> None:
        self.module = module
        self.tensors = tensors  # name inside the module -> name in the weights store
        self.weights = weights
        self.device = device
        self.placeholders = {local: get_tensor(module, local) for local in tensors}

    def fetch(self) -> tuple[dict[str, torch.Tensor], Any]:
        """Read the tensors and start their copy to the device; returns them and an event to wait on."""
        tensors = {local: self.weights.load(stored) for local, stored in self.tensors.items()}
        if self.device.type == "cpu":
            return tensors, None  # the read buffers are used as they are, and recycled on release
        if self.device.type == "cuda":
            stream = _side_stream(self.device)
            with torch.cuda.stream(stream):
                moved = {local: t.to(self.device, non_blocking=True) for local, t in tensors.items()}
                event = torch.cuda.Event()
                event.record(stream)
            event.synchronize()  # this runs off the main thread: the staging buffers are free once copied
        else:
            moved, event = {local: t.to(self.device) for local, t in tensors.items()}, None
        self._recycle(tensors)
        return moved, event

    def _recycle(self, tensors: dict[str, torch.Tensor]) -> None:
        for local, tensor in tensors.items():
            self.weights.recycle(self.tensors[local], tensor)

    def attach(self, tensors: dict[str, torch.Tensor], event: Any) -> None:
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in tensors.values():
                tensor.record_stream(current)  # the side stream's allocation is used on this stream
        for local, tensor in tensors.items():
            placeholder = self.placeholders[local]
            value = nn.Parameter(tensor, requires_grad=False) if isinstance(placeholder, nn.Parameter) else tensor
            set_tensor(self.module, local, value)

    def release(self) -> None:
        if self.device.type == "cpu":
            self._recycle({local: get_tensor(self.module, local).data for local in self.placeholders
                           if get_tensor(self.module, local).device.type == "cpu"})
        for local, placeholder in self.placeholders.items():
            set_tensor(self.module, local, placeholder)


class Prefetcher:
    """Reads the next layers' weights in a background thread while the current layer runs."""

    def __init__(self, order: list[OffloadedModule], depth: int) -> None:
        self.order = order
        self.position = {id(layer): i for i, layer in enumerate(order)}
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-prefetch") if depth > 0 else None
        self.pending: OrderedDict[int, Future] = OrderedDict()

    def acquire(self, layer: OffloadedModule) -> tuple[dict[str, torch.Tensor], Any]:
        future = self.pending.pop(id(layer), None)
        if self.pool is not None:
            self._schedule_after(layer, self.pool)
        return future.result() if future is not None else layer.fetch()

    def _schedule_after(self, layer: OffloadedModule, pool: ThreadPoolExecutor) -> None:
        start = self.position[id(layer)]
        for step in range(1, min(self.depth, len(self.order) - 1) + 1):
            upcoming = self.order[(start + step) % len(self.order)]  # wraps: the next forward starts again
            if id(upcoming) not in self.pending:
                self.pending[id(upcoming)] = pool.submit(upcoming.fetch)
        while len(self.pending) > self.depth:  # never more than depth layers in flight
            _, future = self.pending.popitem(last=False)
            future.cancel()

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class OffloadHooks:
    """The hooks of one dispatched model; ``remove()`` takes them all off again."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.layers: list[OffloadedModule] = []
        self.prefetcher: Prefetcher | None = None

    def offload(self, layers: list[OffloadedModule], prefetch: int) -> None:
        self.layers = layers
        self.prefetcher = prefetcher = Prefetcher(layers, prefetch)
        for layer in layers:
            self.handles.append(layer.module.register_forward_pre_hook(self._before(layer, prefetcher), with_kwargs=True))
            self.handles.append(layer.module.register_forward_hook(self._after(layer), always_call=True))

    def move_inputs(self, module: nn.Module, device: torch.device) -> None:
        """Inputs of ``module`` go to ``device`` (modules placed on another device than their callers)."""
        def hook(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return send_to_device(args, device), send_to_device(kwargs, device)
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def return_outputs_to_input_device(self, model: nn.Module) -> None:
        """The model's outputs come back on the device its first input tensor was on."""
        input_device: torch.device | None = None

        def before(_: nn.Module, args: tuple, kwargs: dict) -> None:
            nonlocal input_device
            first = next((t for t in [*args, *kwargs.values()] if torch.is_tensor(t)), None)
            input_device = first.device if first is not None else None

        def after(_: nn.Module, args: tuple, output: Any) -> Any:
            return send_to_device(output, input_device) if input_device is not None else output
        self.handles.append(model.register_forward_pre_hook(before, with_kwargs=True))
        self.handles.append(model.register_forward_hook(after))

    def _before(self, layer: OffloadedModule, prefetcher: Prefetcher) -> Callable:
        def hook(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            layer.attach(*prefetcher.acquire(layer))
            if layer.device.type != "cpu":
                return send_to_device(args, layer.device), send_to_device(kwargs, layer.device)
            return args, kwargs
        return hook

    def _after(self, layer: OffloadedModule) -> Callable:
        def hook(_: nn.Module, args: tuple, output: Any) -> Any:
            layer.release()
            return output
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.prefetcher is not None:
            self.prefetcher.close()
        for layer in self.layers:
            layer.release()
        self.layers = []  # removing twice must not put placeholders over weights restored in between
        self.prefetcher = None


_SIDE_STREAMS: dict[torch.device, Any] = {}


def _side_stream(device: torch.device) -> Any:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer called ``name`` (dotted) in ``module``."""
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in ``module`` under ``name`` (dotted), as a parameter where a parameter was, else as a buffer."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)
