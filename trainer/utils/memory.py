"""``find_executable_batch_size`` and ``release_memory``: training that shrinks its batch until it fits.

A function decorated with ``find_executable_batch_size`` receives the batch size as its first
argument; when it fails for lack of memory (a device's out-of-memory error, or the CPU allocator's),
the memory is released and it runs again with a smaller batch: 0.9 times the last one, or what
``reduce_batch_size_fn()`` returns. Any other error goes through untouched.
"""

from __future__ import annotations

import functools
import gc
import inspect
from collections.abc import Callable
from typing import Any

from trainer.devices import empty_cache

# Messages torch gives when an allocation fails (a device's, cuDNN's, the CPU allocator's).
_OUT_OF_MEMORY = ("out of memory", "CUDNN_STATUS_NOT_SUPPORTED", "DefaultCPUAllocator: can't allocate memory",
                  "CUDNN_STATUS_ALLOC_FAILED")


def release_memory(*objects: Any) -> list[None]:
    """Collect garbage and empty the device cache; return one None per object (``a, b = release_memory(a, b)``)."""
    gc.collect()
    empty_cache()
    return [None] * len(objects)


def should_reduce_batch_size(exception: BaseException) -> bool:
    """Whether ``exception`` says memory ran out (so a smaller batch may fit)."""
    if isinstance(exception, MemoryError) or type(exception).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exception, RuntimeError) and any(text in str(exception) for text in _OUT_OF_MEMORY)


def find_executable_batch_size(function: Callable[..., Any] | None = None, starting_batch_size: int = 128,
                               reduce_batch_size_fn: Callable[[], int] | None = None) -> Any:
    """Run ``function(batch_size, *args, **kwargs)``, with a smaller batch after each out-of-memory failure.

    Usable as ``@find_executable_batch_size`` or ``@find_executable_batch_size(starting_batch_size=64)``.
    A batch size of 0 is a RuntimeError; passing the batch size yourself is a TypeError.
    """
    if function is None:
        return functools.partial(find_executable_batch_size, starting_batch_size=starting_batch_size,
                                 reduce_batch_size_fn=reduce_batch_size_fn)
    wrapped = function
    batch_size = starting_batch_size

    def smaller() -> int:
        return int(batch_size * 0.9)

    reduce = reduce_batch_size_fn or smaller

    @functools.wraps(wrapped)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal batch_size
        release_memory()
        parameters = list(inspect.signature(wrapped).parameters)
        if len(parameters) < len(args) + 1:
            given = ", ".join(f"{name}={value!r}" for name, value in zip(parameters[1:], args[1:], strict=False))
            raise TypeError(f"{wrapped.__name__}() got the batch size as its first argument, which "
                            f"find_executable_batch_size passes itself: call {wrapped.__name__}({given}).")
        while True:
            if batch_size <= 0:
                raise RuntimeError("No executable batch size found, reached zero.")
            try:
                return wrapped(batch_size, *args, **kwargs)
            except Exception as error:
                if not should_reduce_batch_size(error):
                    raise
                release_memory()
                batch_size = reduce()

    return run
