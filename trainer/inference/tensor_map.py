"""Tensors that are views of a safetensors file's pages: loading costs no copy and no memory up front.

Each file is mapped once, private and copy-on-write (``mmap.ACCESS_COPY``): a tensor reads the
file's bytes through the page cache, pages are brought in when first touched, and a write into
a tensor copies that page into the process's own memory: it never reaches the file. A mapping
lives as long as a tensor that views it.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

from trainer.inference.tensor_reader import TensorLocation


class TensorMap:
    """Maps safetensors files and gives tensors that view them (one mapping per file)."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with path.open("rb") as file:
                self._maps[path] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[path]

    @staticmethod
    def can_map(location: TensorLocation) -> bool:
        """Whether the tensor's bytes start where its dtype may (else it is read into memory of its own)."""
        return location.nbytes > 0 and location.start % location.dtype.itemsize == 0

    def tensor(self, location: TensorLocation) -> torch.Tensor:
        """The tensor at ``location``, viewing the file's pages (check ``can_map`` first)."""
        raw = torch.frombuffer(self._map(location.path), dtype=torch.uint8, count=location.nbytes,
                               offset=location.start)
        return raw.view(location.dtype).view(location.shape)

    def release(self) -> None:
        """Forget the mappings; each stays open while a tensor views it (the tensor holds it)."""
        self._maps.clear()

