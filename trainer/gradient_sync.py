"""The Accelerator's gradient-synchronisation contexts: uneven inputs, ``no_sync``, forcing a sync."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from torch import nn

from trainer.data_loader import PreparedDataLoader
from trainer.data_sharding import ShardedBatchSampler
from trainer.strategies import Strategy
from trainer.utils.enums import DistributedType


class GradientSync:
    """Contexts around backward passes (the Accelerator provides ``strategy`` and its loaders)."""

    strategy: Strategy
    _dataloaders: list[PreparedDataLoader]

    @property
    def distributed_type(self) -> DistributedType | str:
        raise NotImplementedError

    @property
    def even_batches(self) -> bool:
        raise NotImplementedError

    @contextmanager
    def join_uneven_inputs(self, joinables: list[nn.Module], even_batches: bool | None = None) -> Iterator[None]:
        """Train on loaders that give processes different numbers of batches (``even_batches=False``).

        A process that runs out keeps answering the others' gradient all-reduces (DDP's ``Join``)
        instead of leaving them waiting forever. ``even_batches`` overrides the prepared map-style
        loaders' setting inside the block.
        """
        if not str(self.distributed_type).startswith("MULTI_"):
            if self.distributed_type != DistributedType.NO:
                warnings.warn("Joining uneven inputs is only supported for multi-GPU training (and the other "
                              "multi-device DDP layouts, MULTI_CPU included); join_uneven_inputs has no effect here.",
                              stacklevel=3)
            yield
            return
        changed = []
        if even_batches is not None:
            for loader in self._dataloaders:
                sampler = loader.batch_sampler
                if isinstance(sampler, ShardedBatchSampler):
                    changed.append((sampler, sampler.even_batches))
                    sampler.even_batches = even_batches
                else:
                    warnings.warn("Overriding even_batches is only supported for map-style datasets, yet some "
                                  "dataloaders given were iterable.", stacklevel=3)
        try:
            if (self.even_batches if even_batches is None else even_batches):
                yield
            else:
                with self.strategy.join(list(joinables)):
                    yield
        finally:
            for sampler, value in changed:
                sampler.even_batches = value

    def trigger_sync_in_backward(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Synchronise gradients in the next backward even inside ``no_sync`` (a last micro-step written by hand)."""
        return self.strategy.force_backward_sync(model)

    @contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Backward without gradient synchronisation (for hand-written accumulation)."""
        with self.strategy.no_backward_sync(model):
            yield
