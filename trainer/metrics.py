"""Validation metrics, reduced over the whole validation set with one collective.

Per-batch values are kept on the device as running weighted sums; nothing is synchronised
until the end, when every metric's sum and the sample count travel in one all-reduce.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from trainer.strategies import Strategy


# What validation_step may return beside its scalars, for the Metrics callback (not averaged here).
PASSED_THROUGH = ("predictions", "references")


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
            if name in PASSED_THROUGH:
                continue
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


class LogRecord:
    """Values given to ``Trainer.log``, each with its step and a sequence number.

    Trackers ask for what arrived after the sequence number they last sent, so any number of
    them read the same record without clearing it. One value is kept per (name, step); the
    oldest entries are dropped past ``keep`` (trackers catch up after every optimizer step).
    """

    def __init__(self, keep: int = 50_000) -> None:
        self.sequence = 0
        self.keep = keep
        self._entries: dict[tuple[str, int], tuple[float, int]] = {}

    def add(self, name: str, value: float, step: int) -> None:
        self.sequence += 1
        self._entries.pop((name, step), None)  # re-inserted at the end: the order stays by sequence
        self._entries[(name, step)] = (value, self.sequence)
        if len(self._entries) > self.keep:
            for key in list(self._entries)[: self.keep // 2]:
                del self._entries[key]

    def since(self, sequence: int) -> tuple[int, dict[int, dict[str, float]]]:
        """(the current sequence number, {step: {name: value}} for entries after ``sequence``), steps in order."""
        new = []
        for key, (value, seq) in reversed(self._entries.items()):
            if seq <= sequence:
                break
            new.append((key, value))
        by_step: dict[int, dict[str, float]] = {}
        for (name, step), value in reversed(new):
            by_step.setdefault(step, {})[name] = value
        return self.sequence, dict(sorted(by_step.items()))
