"""Dispatched batches: process 0 reads the data, every process gets its slice (``dispatch_batches=True``).

Without ``split_batches`` process 0 reads ``num_replicas`` batches per step and concatenates them,
so each process still gets a batch of the loader's size; with ``split_batches`` it reads one batch
of the global size. The global batch goes to every process (``broadcast_object_list``) and each
keeps its contiguous slice, in rank order, so the processes together see each sample once, in the
order a single process would. A short last round is completed with samples from its own start when
``even_batches`` is set (``remainder`` then counts the real ones, for ``gather_for_metrics``);
otherwise the slices are cut as evenly as the samples allow.

Useful where only one process should read (a stream that must not be opened N times, a source
with side effects). Process 0's loader does the reading; the others never iterate theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from trainer.utils.operations import concatenate, find_batch_size, slice_tensors

Broadcast = Callable[[Any], Any]  # process 0's object on every process


def _complete(batch: Any, size: int, target: int) -> Any:
    """``batch`` (of ``size`` samples) grown to ``target`` samples by repeating its first ones."""
    repeats = math.ceil(target / size)
    return slice_tensors(concatenate([batch] * repeats), slice(0, target))


def dispatched_batches(iterator: Iterator[Any] | None, num_replicas: int, rank: int, split_batches: bool,
                       even_batches: bool, broadcast: Broadcast, on_remainder: Callable[[int], None],
                       slice_fn: Callable[..., Any] | None = None) -> Iterator[Any]:
    """Yield this process's slice of each global batch that process 0 reads from ``iterator`` (None elsewhere).

    ``slice_fn(batch, slice, process_index=..., num_processes=...)`` cuts the slice (Accelerate's
    ``slice_fn_for_dispatch``); by default every tensor is sliced along its first dimension.
    """
    per_step = 1 if split_batches else num_replicas
    while True:
        payload = None
        if iterator is not None:
            batches = [batch for _, batch in zip(range(per_step), iterator, strict=False)]
            payload = concatenate(batches) if len(batches) > 1 else (batches[0] if batches else None)
            if payload is not None:
                payload = _to_cpu(payload)
        payload = broadcast(payload)
        if payload is None:
            return
        size = find_batch_size(payload)
        if size is None:
            raise TypeError("dispatch_batches=True slices each batch along its first dimension; this loader's batches "
                            "hold no tensor to slice. Leave dispatch_batches unset.")
        per_process = math.ceil(size / num_replicas)
        if size < per_process * num_replicas and even_batches:
            on_remainder(size)
            payload = _complete(payload, size, per_process * num_replicas)
        start, stop = rank * per_process, min((rank + 1) * per_process, size if not even_batches else 10**18)
        if start >= stop:
            # Nothing left for this process in the last round; it still takes part in the next broadcast.
            continue
        if slice_fn is None:
            yield slice_tensors(payload, slice(start, stop))
        else:
            yield slice_fn(payload, slice(start, stop), process_index=rank, num_processes=num_replicas)


def _to_cpu(batch: Any) -> Any:
    from trainer.utils.operations import send_to_device

    return send_to_device(batch, torch.device("cpu"))


def dispatched_length(batches: int, num_replicas: int, split_batches: bool) -> int:
    """Steps of a dispatched pass over a loader of ``batches`` batches."""
    return batches if split_batches else math.ceil(batches / num_replicas)
