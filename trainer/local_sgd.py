"""Local SGD: each process takes optimizer steps on its own, and the replicas are averaged every few steps.

    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=8) as local_sgd:
        for batch in loader:
            ...  # backward, optimizer.step(), optimizer.zero_grad()
            local_sgd.step()

Inside the block backward does not synchronise gradients; instead, every ``local_sgd_steps``
calls of ``step()`` and once more on leaving the block, every parameter is replaced by its mean
over the processes. The same class and arguments as ``accelerate.local_sgd.LocalSGD``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.utils.enums import DistributedType

if TYPE_CHECKING:
    from trainer.accelerator import Accelerator

# Plain data parallel: every process holds the whole model, so averaging its parameters is meaningful.
SUPPORTED = frozenset({
    DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.MULTI_XPU,
    DistributedType.MULTI_MLU, DistributedType.MULTI_HPU, DistributedType.MULTI_SDAA, DistributedType.MULTI_MUSA,
    DistributedType.MULTI_NPU, DistributedType.MULTI_NEURON,
})
BUCKET_ELEMENTS = 1 << 24  # values per all-reduce when averaging (64 MiB of fp32)


def _buckets(params: Iterable[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """The parameters grouped by device and dtype, in runs of at most ``BUCKET_ELEMENTS`` values (same order everywhere)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for param in params:
        by_kind.setdefault((param.device, param.dtype), []).append(param)
    for group in by_kind.values():
        bucket: list[nn.Parameter] = []
        size = 0
        for param in group:
            if bucket and size + param.numel() > BUCKET_ELEMENTS:
                yield bucket
                bucket, size = [], 0
            bucket.append(param)
            size += param.numel()
        yield bucket


class UnsupportedLocalSGD(ValueError, NotImplementedError):
    """LocalSGD under a strategy it cannot average (a ValueError; a NotImplementedError as Accelerate raises)."""


class LocalSGD:
    """Average ``model``'s parameters over the processes every ``local_sgd_steps`` steps, instead of every step.

    Args:
        accelerator: the ``Accelerator`` that prepared ``model``.
        model: the prepared model whose parameters are averaged.
        local_sgd_steps: ``step()`` calls between two averages.
        enabled: ``False`` (or a single process) makes the block and ``step()`` do nothing.

    Raises:
        ValueError: under DeepSpeed, FSDP, Megatron-LM, XLA or another strategy that shards or
            manages the parameters; there, use plain data parallel or leave LocalSGD out.
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, local_sgd_steps: int, enabled: bool = True) -> None:
        kind = accelerator.distributed_type
        if kind not in SUPPORTED:
            raise UnsupportedLocalSGD(
                f"LocalSGD averages whole parameters on every process and cannot run under distributed_type={kind!s}, "
                "whose parameters are sharded or managed by the strategy. Use plain data parallel (one process per "
                "device: MULTI_CPU, MULTI_GPU...) for LocalSGD, or drop LocalSGD and use gradient accumulation "
                "(Accelerator(gradient_accumulation_steps=...)) to synchronise less often.")
        if enabled and (not isinstance(local_sgd_steps, int) or isinstance(local_sgd_steps, bool) or local_sgd_steps < 1):
            raise ValueError(f"LocalSGD(local_sgd_steps={local_sgd_steps!r}): use a whole number >= 1.")
        self.accelerator = accelerator
        self.model = model
        self.local_sgd_steps = local_sgd_steps
        self.enabled = enabled and kind != DistributedType.NO
        self.num_steps = 0
        self._no_sync: AbstractContextManager[None] | None = None

    def __enter__(self) -> LocalSGD:
        if self.enabled:
            self._no_sync = self.accelerator.no_sync(self.model)
            self._no_sync.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._no_sync is None:
            return
        try:
            if exc_type is None:  # after an error the other processes may never reach the collective
                self._sync_and_avg_model_params()
        finally:
            self._no_sync.__exit__(exc_type, exc, traceback)
            self._no_sync = None

    def step(self) -> None:
        """Count one optimizer step; every ``local_sgd_steps``-th one averages the parameters."""
        self.num_steps += 1
        if self.enabled and self.num_steps % self.local_sgd_steps == 0:
            self._sync_and_avg_model_params()

    def _sync_and_avg_model_params(self) -> None:
        """Replace every parameter by its mean over the processes (the same values everywhere afterwards).

        Parameters of one device and dtype travel together, in flat buckets of up to ``BUCKET_ELEMENTS``
        values: a few all-reduces per average instead of one per parameter.
        """
        with torch.no_grad():
            for bucket in _buckets(self.model.parameters()):
                flat = torch.cat([p.detach().reshape(-1) for p in bucket])
                averaged = self.accelerator.reduce(flat, reduction="mean")
                for param, value in zip(bucket, averaged.split([p.numel() for p in bucket])):
                    param.copy_(value.view_as(param))
