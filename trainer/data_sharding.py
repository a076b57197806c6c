"""Giving each process its share of the data so that N processes see what one process would.

Map-style data: the batches the user's sampler produces are dealt out in turn, batch ``i`` to
process ``i % N`` (or, with ``split_batches``, every batch is cut into N slices). A step of N
processes therefore covers exactly the samples of N consecutive single-process batches, in
order, and ``gather`` puts them back in that order.

``even_batches`` keeps every process stepping the same number of times (DDP needs matching
collectives): the last, short round is completed with samples from the start of the epoch, and
``remainder`` tells ``gather_for_metrics`` how many gathered samples of the last round are real.

Iterable data: Hugging Face ``datasets.IterableDataset`` is split with
``datasets.distributed.split_dataset_by_node``; other iterables are read by every process and
cut into the same per-process chunks as above.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import IterableDataset, Sampler


class ShardedBatchSampler(Sampler[Any]):
    """One process's batches of a global batch sampler (see the module docstring).

    Args:
        batch_sampler: yields the batches (lists of indices) a single process would use; any
            sampler works, its items are then dealt out one by one.
        num_replicas, rank: the process layout.
        even_batches: pad the last round so every process gets the same number of batches.
        split_batches: cut each batch into ``num_replicas`` slices instead of dealing whole batches.
        drop_last: batches of a short last round are dropped rather than padded.
    """

    def __init__(self, batch_sampler: Iterable[Any], num_replicas: int, rank: int, even_batches: bool = True,
                 split_batches: bool = False, drop_last: bool = False) -> None:
        self.batch_sampler = batch_sampler
        self.num_replicas, self.rank = num_replicas, rank
        self.even_batches, self.split_batches, self.drop_last = even_batches, split_batches, drop_last
        self.remainder = -1  # real samples in the last gathered round; -1 when nothing was padded

    @property
    def sampler(self) -> Any:
        return getattr(self.batch_sampler, "sampler", self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        for candidate in (self.batch_sampler, self.sampler):
            if hasattr(candidate, "set_epoch"):
                candidate.set_epoch(epoch)
                return

    def __len__(self) -> int:
        batches = len(self.batch_sampler)  # type: ignore[arg-type]  # the loader's batch sampler has a length here
        if self.split_batches:
            return batches
        if self.drop_last:
            return batches // self.num_replicas
        if self.even_batches:
            return -(-batches // self.num_replicas)
        return batches // self.num_replicas + (1 if self.rank < batches % self.num_replicas else 0)

    def __iter__(self) -> Iterator[Any]:
        self.remainder = -1
        if self.split_batches:
            yield from self._split()
        else:
            yield from self._deal()

    # -- whole batches dealt in turn ---------------------------------------------------------------
    def _deal(self) -> Iterator[Any]:
        filler = _Filler()
        previous: list[Any] | None = None  # a complete round is held back until we know it is not the last
        round_: list[Any] = []
        for batch in self.batch_sampler:
            filler.remember(batch)
            round_.append(batch)
            if len(round_) == self.num_replicas:
                if previous is not None:
                    yield previous[self.rank]
                previous, round_ = round_, []
        if round_:
            if previous is not None:
                yield previous[self.rank]
            yield from self._last_round(round_, filler)
        elif previous is not None:
            yield from self._last_round(previous, filler)

    def _last_round(self, round_: list[Any], filler: _Filler) -> Iterator[Any]:
        n, rank = self.num_replicas, self.rank
        # What every batch should hold: the batch sampler's size, else the size of the epoch's first batch.
        full = getattr(self.batch_sampler, "batch_size", None) if filler.batch_size is not None else None
        full = full or filler.batch_size
        if len(round_) == n and (full is None or _size(round_[-1]) == full):
            yield round_[rank]
            return
        if self.drop_last:
            return
        if not self.even_batches:
            if rank < len(round_):
                yield round_[rank]
            return
        if full is None:  # whole batches from the dataset: their sizes are unknown here
            round_ += [filler.item() for _ in range(n - len(round_))]
        else:
            self.remainder = sum(len(batch) for batch in round_)
            round_ = [_pad(batch, full, filler) for batch in round_ + [[]] * (n - len(round_))]
        yield round_[rank]

    # -- every batch cut into slices -----------------------------------------------------------------
    def _split(self) -> Iterator[Any]:
        n, rank = self.num_replicas, self.rank
        filler = _Filler()
        for batch in self.batch_sampler:
            filler.remember(batch)
            size = len(batch)
            if size % n:
                if self.drop_last:
                    return
                if not self.even_batches:
                    raise ValueError(
                        f"split_batches with even_batches=False needs every batch to divide among {n} processes; "
                        f"a batch of {size} does not."
                    )
                self.remainder = size
                batch = _pad(batch, size + n - size % n, filler)
            share = len(batch) // n
            yield batch[rank * share:(rank + 1) * share]


class _Filler:
    """Samples from the start of the epoch, handed out in a cycle to complete a short last round."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self._cycle: Iterator[Any] | None = None
        self.batch_size: int | None = None

    def remember(self, batch: Any) -> None:
        if self.batch_size is None and not self.seen:
            self.batch_size = _size(batch)
        if len(self.seen) < 4096:
            self.seen.extend(batch if isinstance(batch, list) else [batch])

    def item(self) -> Any:
        if self._cycle is None:
            self._cycle = itertools.cycle(self.seen)
        return next(self._cycle)


def _size(batch: Any) -> int | None:
    return len(batch) if isinstance(batch, list) else None


def _pad(batch: list[Any], size: int, filler: _Filler) -> list[Any]:
    return list(batch) + [filler.item() for _ in range(size - len(batch))]


class IterableDatasetShard(IterableDataset):
    """One process's share of an iterable: of every ``num_replicas * batch_size`` items, its own chunk.

    Every process reads the whole iterable (there are no indices to skip by), keeping the items
    that a single process would have put in the batches now dealt to this process. With
    ``even_batches`` the last round is completed with items from the start.
    """

    def __init__(self, dataset: Iterable[Any], batch_size: int, num_replicas: int, rank: int,
                 even_batches: bool = True, drop_last: bool = False) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.even_batches, self.drop_last = even_batches, drop_last
        self.remainder = -1

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        self.remainder = -1
        chunk = self.batch_size * self.num_replicas
        start, end = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        first: list[Any] = []
        buffer: list[Any] = []
        for item in self.dataset:
            if len(first) < chunk:
                first.append(item)
            buffer.append(item)
            if len(buffer) == chunk:
                yield from buffer[start:end]
                buffer = []
        if not buffer or self.drop_last:
            return
        if not self.even_batches:
            yield from buffer[start:end]
            return
        self.remainder = len(buffer)
        refill = itertools.cycle(first)
        while len(buffer) < chunk:
            buffer.append(next(refill))
        yield from buffer[start:end]
