"""How much of the data a run uses: ``fast_dev_run``, ``limit_train_batches``, ``limit_eval_batches``, ``overfit_batches``.

A limit is a number of batches (a whole number) or a fraction of each pass (a float in (0, 1]);
the prepared loader then ends its pass after that many batches, so the last one closes an
accumulation group as the end of the data does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _check(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: use a whole number of batches, a fraction in (0, 1], or None.")
    if isinstance(value, float) and not 0.0 < value <= 1.0 and not (allow_zero and value == 0.0):
        raise ValueError(f"{name}={value!r}: a fraction of the batches must lie in (0, 1]; a whole number counts batches.")
    if isinstance(value, int) and value < (0 if allow_zero else 1):
        raise ValueError(f"{name}={value!r}: use a whole number >= {0 if allow_zero else 1} of batches, or a fraction.")


@dataclass(frozen=True)
class DataLimits:
    """The Trainer's batch limits, checked when it is built and applied to its prepared loaders."""

    train: int | float | None = None
    eval: int | float | None = None
    overfit: int | float = 0
    fast_dev_run: int = 0

    @classmethod
    def from_arguments(cls, fast_dev_run: bool | int, limit_train_batches: Any, limit_eval_batches: Any,
                       overfit_batches: Any) -> DataLimits:
        if not isinstance(fast_dev_run, (bool, int)) or fast_dev_run < 0:
            raise ValueError(f"fast_dev_run={fast_dev_run!r}: use True (one batch), a whole number of batches, or False.")
        _check("limit_train_batches", limit_train_batches)
        _check("limit_eval_batches", limit_eval_batches)
        _check("overfit_batches", overfit_batches, allow_zero=True)
        runs = int(fast_dev_run)
        if runs:
            return cls(train=runs, eval=runs, fast_dev_run=runs)
        if overfit_batches:
            return cls(train=overfit_batches, eval=overfit_batches, overfit=overfit_batches)
        return cls(train=limit_train_batches, eval=limit_eval_batches)

    def apply(self, loader: Any, limit: int | float | None, name: str) -> None:
        """Set ``loader.limit`` from ``limit`` (a fraction of the loader's length, at least one batch)."""
        if loader is None or limit is None:
            return
        if isinstance(limit, float):
            try:
                length = len(loader)
            except TypeError:
                raise ValueError(f"{name}={limit}: a fraction needs data whose length is known; this loader's is not "
                                 "(an iterable dataset). Give a whole number of batches.") from None
            limit = max(1, int(length * limit))
        loader.limit = limit
