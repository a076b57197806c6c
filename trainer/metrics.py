"""Validation metrics, reduced over the whole validation set with one collective.

Per-batch values are kept on the device as running weighted sums; nothing is synchronised
until the end, when every metric's sum and the sample count travel in one all-reduce.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from strategies import Strategy


class MetricAccumulator:
    """Sample-weighted means of scalar metrics over many batches and processes."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0.0

    def update(self, metrics: Mapping[str, Any] | None, batch_size: int) -> None:
        if not metrics:
            return
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"validation_step must return a dict of scalar metrics (e.g. {{'val_loss': loss}}), "
                f"got {type(metrics).__name__}."
            )
        for name, value in metrics.items():
            value = torch.as_tensor(value).detach()
            if value.numel() != 1:
                raise ValueError(f"validation_step returned {name!r} with shape {tuple(value.shape)}; "
                                 "metrics must be scalars (reduce them inside validation_step).")
            weighted = value.reshape(()).double() * batch_size
            self._sums[name] = self._sums[name] + weighted if name in self._sums else weighted
        self._count += batch_size

    def compute(self, strategy: Strategy) -> dict[str, float]:
        """The means over every sample seen by every process (one collective for all metrics)."""
        if not self._sums:
            return {}
        names = sorted(self._sums)
        device = self._sums[names[0]].device
        packed = torch.stack([self._sums[n].to(device) for n in names]
                             + [torch.tensor(self._count, dtype=torch.float64, device=device)])
        totals = strategy.all_reduce(packed, op="sum").tolist()
        count = totals[-1]
        return {name: totals[i] / count for i, name in enumerate(names)}
