"""Where offloaded weights live while the model runs: CPU memory, or safetensors files on disk.

Weights on disk are read from the checkpoint's own safetensors files when they can be used as
they are (no copy is made), and otherwise written once into an offload folder, one safetensors
file per group written (a checkpoint shard, or a module), then read from there.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.inference.tensor_reader import TensorLocation, TensorReader, safetensors_locations


class OffloadedWeights:
    """Tensors by name, each held in CPU memory or located in a safetensors file."""

    def __init__(self, offload_folder: str | os.PathLike | None = None, pin: bool = False) -> None:
        self.offload_folder = Path(offload_folder).expanduser() if offload_folder is not None else None
        if self.offload_folder is not None:
            _check_folder(self.offload_folder)
        self.pin = pin  # pinned CPU copies make copies to an accelerator asynchronous
        self._in_memory: dict[str, torch.Tensor] = {}
        self._on_disk: dict[str, TensorLocation] = {}
        self._convert: dict[str, torch.dtype] = {}  # located tensors read as another dtype than the file's
        self._reader = TensorReader()
        self._written = 0
        # Buffers that disk reads go into, reused: a fresh 64 MB tensor per read would cost more in
        # page faults than the read itself. A layer's buffers come back when it has run.
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._free_lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._in_memory or name in self._on_disk

    def keep_in_memory(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        self._in_memory[name] = tensor.pin_memory() if self.pin else tensor

    def locate(self, name: str, location: TensorLocation, dtype: torch.dtype | None = None) -> None:
        """Read ``name`` from an existing file when needed (the checkpoint's own safetensors), as ``dtype`` if given."""
        self._on_disk[name] = location
        if dtype is not None and dtype != location.dtype:
            self._convert[name] = dtype
        else:
            self._convert.pop(name, None)

    def write(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write tensors to the offload folder once (one file), then read them from there."""
        if not tensors:
            return
        if self.offload_folder is None:
            raise ValueError("Some weights go to disk but no offload folder was given: pass offload_folder= "
                             "(a directory where they are written once), or give the CPU more max_memory.")
        self.offload_folder.mkdir(parents=True, exist_ok=True)
        path = self.offload_folder / f"offload-{os.getpid()}-{self._written:05d}.safetensors"
        self._written += 1
        save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}, str(path))
        for name, location in safetensors_locations(path).items():
            self._on_disk[name] = location

    def load(self, name: str) -> torch.Tensor:
        """The tensor on the CPU: the held one, or a read from its file into a buffer (give it back with ``recycle``)."""
        if name in self._in_memory:
            return self._in_memory[name]
        location = self._on_disk[name]
        with self._free_lock:
            free = self._free.get((location.shape, location.dtype))
            buffer = free.pop() if free else None
        dtype = self._convert.get(name)
        if dtype is None:
            return self._reader.read(location, pin=self.pin, out=buffer)
        read = self._reader.read(location, out=buffer)
        converted = read.to(dtype)
        converted = converted.pin_memory() if self.pin else converted
        self.recycle(name, read, converted=False)  # the read buffer is free again at once
        return converted

    def recycle(self, name: str, tensor: torch.Tensor, converted: bool | None = None) -> None:
        """Take back a buffer ``load`` filled for ``name`` once nothing uses it any more (converted copies are dropped)."""
        if converted is None:
            converted = name in self._convert
        if name in self._on_disk and not converted:
            with self._free_lock:
                self._free[(tuple(tensor.shape), tensor.dtype)].append(tensor)

    def names(self) -> list[str]:
        return [*self._in_memory, *self._on_disk]

    def close(self) -> None:
        self._reader.close()
        self._free.clear()


def _check_folder(folder: Path) -> None:
    """An offload folder must be a folder, or a path where one can be made: one clear error before any work."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == folder else f"is inside {probe}, which is a file"
        raise ValueError(f"offload_folder={str(folder)!r} {where}; give a directory (it is created if missing) where "
                         "offloaded weights can be written.")
