"""Asynchronous checkpoints: the state is copied once (staged), then written by a background thread.

``StagingBuffers`` holds the copies, reused from one save to the next (pinned where an accelerator
is present, so device-to-host copies run at full speed). ``CheckpointWriter`` runs one write at a
time on its own thread; the next save, ``load_state``, the end of ``fit`` and ``end_training`` wait
for it, and raise what it raised. With several processes the writer agrees with the others over a
process group of its own, so its collectives never interleave with the training's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist


class StagingBuffers:
    """CPU copies of checkpoint tensors, kept for the next save of the same state.

    Tensors that share memory (tied weights) share their copy too, so the file written from the
    copies is byte-identical to one written from the live tensors.
    """

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """The bytes the buffers hold."""
        return sum(buffer.numel() for buffer in self._buffers.values())

    def _buffer(self, key: str, nbytes: int) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() != nbytes:  # exact size: shared-tensor detection compares storage sizes
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[key] = buffer
        return buffer

    def copy(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` (same dtype, shape, strides and sharing), each storage copied once."""
        copied: dict[int, torch.Tensor] = {}  # live storage address -> its buffer
        out = {}
        for name, tensor in tensors.items():
            tensor = tensor.detach()
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            buffer = copied.get(address) if address else None
            if buffer is None:
                buffer = self._buffer(f"{prefix}{name}", storage.nbytes())
                if storage.nbytes():  # as bytes: Tensor.copy_ also crosses from an accelerator
                    buffer.copy_(torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage))
                if address:
                    copied[address] = buffer
            out[name] = torch.empty(0, dtype=tensor.dtype).set_(buffer.untyped_storage(), tensor.storage_offset(),
                                                                 tensor.size(), tensor.stride())
        return out


class CheckpointWriter:
    """Runs checkpoint writes on one background thread, one at a time."""

    def __init__(self, num_processes: int) -> None:
        self.num_processes = num_processes
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._group: Any = None
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        """Whether a write was handed over and not yet waited for."""
        return self._pending is not None

    @property
    def group(self) -> Any:
        """The writer's process group (None on one process)."""
        return self._group

    def prepare(self) -> None:
        """Create the writer's process group (a collective: every process calls it, on the training thread)."""
        if self.num_processes > 1 and self._group is None:
            self._group = dist.new_group(backend="gloo")

    def submit(self, write: Callable[[], None]) -> None:
        """Wait for the pending write (raising its error), then run ``write`` in the background."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        with self._lock:
            self._pending = self._executor.submit(write)

    def wait(self) -> None:
        """Block until the pending write has finished; raise what it raised."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, over the writer's own group (from the writer thread)."""
        if self.num_processes == 1:
            return [obj]
        out: list[Any] = [None] * self.num_processes
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Process ``src``'s ``obj`` on every process, over the writer's own group."""
        if self.num_processes == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self._group)
        return box[0]

    def __getstate__(self) -> dict[str, Any]:
        """A pickled accelerator takes its writer's settings, not its thread, lock or pending write."""
        return {"num_processes": self.num_processes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["num_processes"])  # type: ignore[misc]

    def close(self) -> None:
        """Wait for the pending write, then stop the thread (raises the write's error)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
