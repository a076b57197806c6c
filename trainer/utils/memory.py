"""Batch sizes that fit in memory: the search, out-of-memory recognition, ``find_executable_batch_size``.

``BatchSizeSearch`` decides which batch size to try next from how the last one went (it fit, or
it ran out of memory); ``search_batch_size`` runs tries until the search is over, treating an
out-of-memory error (``should_reduce_batch_size``) as "it does not fit" and any other error as an
error. Both the low-code ``find_executable_batch_size`` and the Trainer's ``BatchSizeFinder``
callback use them.

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
from typing import Any, TypeVar

from trainer.devices import empty_cache

# Messages torch gives when an allocation fails (a device's, cuDNN's, the CPU allocator's).
_OUT_OF_MEMORY = ("out of memory", "CUDNN_STATUS_NOT_SUPPORTED", "DefaultCPUAllocator: can't allocate memory",
                  "CUDNN_STATUS_ALLOC_FAILED")

SEARCH_MODES = ("shrink", "power", "binsearch")

_Result = TypeVar("_Result")


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


class BatchSizeSearch:
    """Which batch size to try next, from whether the last one fit in memory.

    Modes:

    - ``"shrink"``: start large; after each failure try ``reduce(size)`` (default: 0.9 times the
      size, rounded down); the first size that fits ends the search.
    - ``"power"``: double the size while it fits; the first failure ends the search at the last
      size that fit (when even the first fails, halve until one fits).
    - ``"binsearch"``: double while it fits; after the first failure, bisect between the largest
      size that fit and the smallest that failed until they are neighbours.

    Growing stops at ``max_value``, and the search ends after ``max_trials`` tries. ``value`` is
    the size to try now; ``best`` the largest that fit (0 before one does); ``done`` says it is over.
    """

    def __init__(self, start: int, mode: str = "shrink", max_value: int | None = None, max_trials: int | None = None,
                 reduce: Callable[[int], int] | None = None) -> None:
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode={mode!r} is not a batch size search: use one of {list(SEARCH_MODES)}.")
        self.mode = mode
        self.value = start if max_value is None else min(start, max_value)
        self.max_value = max_value
        self.max_trials = max_trials
        self.reduce = reduce or (lambda size: int(size * 0.9))
        self.best = 0  # the largest size that fit
        self.smallest_failure: int | None = None
        self.tried: list[tuple[int, bool]] = []  # (size, fit) in the order tried
        self.done = False

    def record(self, fits: bool) -> None:
        """Note how ``value`` went and move ``value`` to the next size to try (or set ``done``)."""
        size = self.value
        self.tried.append((size, fits))
        if fits:
            self.best = max(self.best, size)
        else:
            self.smallest_failure = size if self.smallest_failure is None else min(self.smallest_failure, size)
        self.value, self.done = self._next(size, fits)
        if not self.done and self.best and self.max_trials is not None and len(self.tried) >= self.max_trials:
            self.value, self.done = self.best, True

    def _next(self, size: int, fits: bool) -> tuple[int, bool]:
        if self.mode == "shrink":
            return (size, True) if fits else (self.reduce(size), False)
        if self.smallest_failure is None:  # still growing: everything so far fit
            if self.max_value is not None and size >= self.max_value:
                return size, True
            grown = size * 2 if self.max_value is None else min(size * 2, self.max_value)
            return grown, False
        if self.mode == "power" and self.best:  # power ends at the first failure after a fit
            return self.best, True
        middle = (self.best + self.smallest_failure) // 2
        if middle <= self.best:  # neighbours: best fits and best + 1 does not
            return (self.best, True) if self.best else (0, False)
        return middle, False

    def summary(self) -> str:
        """The sizes tried, in order, each marked with whether it fit: ``"2 ok, 4 ok, 8 out of memory"``."""
        return ", ".join(f"{size} {'ok' if fits else 'out of memory'}" for size, fits in self.tried)


def search_batch_size(search: BatchSizeSearch, attempt: Callable[[int], _Result]) -> _Result | None:
    """Call ``attempt(size)`` for each size ``search`` proposes, until it is done; return the last fitting result.

    An out-of-memory error (``should_reduce_batch_size``) marks the size as too large and frees the
    memory the failed try held; any other error propagates. When the proposals reach zero, or the
    tries run out before any size fits, no batch size fits: a RuntimeError.
    """
    result = None
    while not search.done:
        if search.value < 1:
            raise RuntimeError(f"No executable batch size found, reached zero. Sizes tried: {search.summary()}.")
        if search.max_trials is not None and len(search.tried) >= search.max_trials:
            raise RuntimeError(f"No executable batch size found in {search.max_trials} tries ({search.summary()}): "
                               "raise max_trials, or start from a smaller size.")
        try:
            result = attempt(search.value)
            fits = True
        except Exception as error:
            if not should_reduce_batch_size(error):
                raise
            fits = False
        if not fits:
            # Out of the except block: the error's traceback (and the tensors its frames held) is gone.
            release_memory()
        search.record(fits)
    return result


def find_executable_batch_size(function: Callable[..., Any] | None = None, starting_batch_size: int = 128,
                               reduce_batch_size_fn: Callable[[], int] | None = None) -> Any:
    """Run ``function(batch_size, *args, **kwargs)``, with a smaller batch after each out-of-memory failure.

    Usable as ``@find_executable_batch_size`` or ``@find_executable_batch_size(starting_batch_size=64)``.
    A batch size of 0 is a RuntimeError; passing the batch size yourself is a TypeError. The size
    that worked is where the next call starts.
    """
    if function is None:
        return functools.partial(find_executable_batch_size, starting_batch_size=starting_batch_size,
                                 reduce_batch_size_fn=reduce_batch_size_fn)
    wrapped = function
    batch_size = starting_batch_size
    reduce = None if reduce_batch_size_fn is None else (lambda size: reduce_batch_size_fn())

    @functools.wraps(wrapped)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal batch_size
        release_memory()
        parameters = list(inspect.signature(wrapped).parameters)
        if len(parameters) < len(args) + 1:
            given = ", ".join(f"{name}={value!r}" for name, value in zip(parameters[1:], args[1:], strict=False))
            raise TypeError(f"{wrapped.__name__}() got the batch size as its first argument, which "
                            f"find_executable_batch_size passes itself: call {wrapped.__name__}({given}).")
        search = BatchSizeSearch(batch_size, mode="shrink", reduce=reduce)
        try:
            return search_batch_size(search, lambda size: wrapped(size, *args, **kwargs))
        finally:
            batch_size = search.value

    return run
