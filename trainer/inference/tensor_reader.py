"""Read single tensors out of safetensors files with ``pread``, straight into their own memory.

Offloaded weights are read this way each time a layer runs. ``os.preadv`` fills the tensor's
buffer with no intermediate copy, releases the GIL while the disk (or page cache) works, so a
prefetch thread overlaps reading with compute, and leaves nothing mapped into the process:
resident memory stays what the tensors themselves take.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: a file and a byte range, with its dtype and shape."""

    path: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def safetensors_locations(path: str | os.PathLike) -> dict[str, TensorLocation]:
    """Every tensor of a safetensors file, from its header (the data is not read)."""
    path = Path(path)
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    base = 8 + length
    locations = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        locations[name] = TensorLocation(path, base + start, base + end, SAFETENSORS_DTYPES[info["dtype"]],
                                         tuple(info["shape"]))
    return locations


class TensorReader:
    """Reads tensors by location, keeping one open file descriptor per file (thread-safe)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read(self, location: TensorLocation, pin: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, read into ``out`` (a reused buffer of its shape and dtype) or freshly allocated CPU
        memory (pinned if asked, for fast copies to an accelerator)."""
        tensor = out if out is not None else torch.empty(location.shape, dtype=location.dtype, pin_memory=pin)
        if location.nbytes:
            buffer = tensor.view(-1).view(torch.uint8).numpy().data  # a writable memoryview of the tensor's bytes
            fd, done = self._fd(location.path), 0
            while done < location.nbytes:
                got = os.preadv(fd, [buffer[done:]], location.start + done)
                if got <= 0:
                    raise OSError(f"{location.path} ended before the tensor's bytes ({location.start}..{location.end}): "
                                  "the file is truncated; write it again.")
                done += got
        return tensor

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
