"""Prepared data loaders: device placement, resumable shuffling, end-of-epoch look-ahead.

A prepared loader wraps a DataLoader rebuilt from the user's arguments, with two changes:

* a shuffling sampler draws its permutation from ``seed + epoch`` rather than from the global
  RNG at ``iter()`` time, so an epoch's order can be reproduced after a restart;
* the index sampler can skip its first batches without loading them, which is how
  ``skip_first_batches`` resumes mid-epoch cheaply.

Iteration looks one batch ahead so that the accumulation policy knows, while the last batch is
being processed, that the epoch ends there (the last, possibly short, group is a boundary).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler

from trainer.data_dispatch import dispatched_batches, dispatched_length
from trainer.data_sharding import IterableDatasetShard as ItemShard
from trainer.data_sharding import ShardedBatchSampler
from trainer.operations import send_to_device

if TYPE_CHECKING:
    from trainer.accumulation import GradientAccumulation

_LOADER_ARGS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                "multiprocessing_context", "generator", "persistent_workers", "pin_memory_device", "in_order")


class SeededRandomSampler(Sampler[int]):
    """A RandomSampler whose order is a function of ``(seed, epoch)`` only."""

    def __init__(self, data_source: Sized, seed: int, replacement: bool = False,
                 num_samples: int | None = None) -> None:
        self.data_source = data_source
        self.seed = int(seed)
        self.epoch = 0
        self.replacement = replacement
        self._num_samples = num_samples

    @property
    def num_samples(self) -> int:
        return len(self.data_source) if self._num_samples is None else self._num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        n = len(self.data_source)
        if self.replacement:
            yield from torch.randint(n, (self.num_samples,), generator=generator).tolist()
            return
        for _ in range(self.num_samples // n):
            yield from torch.randperm(n, generator=generator).tolist()
        yield from torch.randperm(n, generator=generator)[: self.num_samples % n].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])


class SeedableRandomSampler(SeededRandomSampler):
    """``RandomSampler``'s signature with a seeded order: ``seed + epoch`` draws each pass (Accelerate's name).

    The seed is ``data_seed``, else the process's torch seed. Used on its own in a DataLoader, each
    completed pass moves to the next epoch; inside a prepared loader, the loader sets the epoch.
    """

    def __init__(self, data_source: Sized, replacement: bool = False, num_samples: int | None = None,
                 generator: torch.Generator | None = None, data_seed: int | None = None) -> None:
        super().__init__(data_source, torch.initial_seed() if data_seed is None else data_seed, replacement, num_samples)
        self.initial_seed = self.seed
        self.generator = generator
        self.advance_after_pass = True  # a prepared loader sets the epoch itself and turns this off

    def __iter__(self) -> Iterator[int]:
        yield from super().__iter__()
        if self.advance_after_pass:
            self.set_epoch(self.epoch + 1)


class SkippableSampler(Sampler[Any]):
    """Wraps an index or batch sampler; the next pass starts ``skip`` items in, without loading them."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.skip = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def set_epoch(self, epoch: int) -> None:
        inner = getattr(self.sampler, "sampler", self.sampler)
        for candidate in (self.sampler, inner):
            if hasattr(candidate, "set_epoch"):
                candidate.set_epoch(epoch)
                return

    @property
    def base_sampler(self) -> Any:
        """The index sampler (inside the batch sampler, if there is one)."""
        return getattr(self.sampler, "sampler", self.sampler)


@dataclass(frozen=True)
class Sharding:
    """How a loader is split across processes (see ``trainer.data_sharding``)."""

    num_replicas: int
    rank: int
    even_batches: bool = True
    split_batches: bool = False
    dispatch_batches: bool = False  # process 0 reads, every process gets its slice (trainer.data_dispatch)
    slice_fn: Callable[..., Any] | None = None  # how a dispatched batch is cut (default: along the first dimension)


def _shard_iterable(dataset: Any, batch_size: int | None, sharding: Sharding, drop_last: bool) -> Any:
    if _is_hf_iterable(dataset):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(dataset, rank=sharding.rank, world_size=sharding.num_replicas)
    if batch_size is None:
        raise ValueError("Sharding an iterable dataset across processes needs a batch_size on its DataLoader.")
    return ItemShard(dataset, batch_size, sharding.num_replicas, sharding.rank,
                                even_batches=sharding.even_batches, drop_last=drop_last)


def _is_hf_iterable(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("datasets.") and hasattr(dataset, "n_shards")


def _rebuild(loader: DataLoader, sharding: Sharding | None = None,
             seed: int | None = None) -> tuple[DataLoader, SkippableSampler | None]:
    """A DataLoader equal to ``loader`` but with a seeded shuffle, this process's share of the data,
    and a skippable index sampler."""
    kwargs = {name: getattr(loader, name) for name in _LOADER_ARGS if hasattr(loader, name)}
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    dataset = loader.dataset
    batch_size = loader.batch_size
    if sharding is not None and sharding.split_batches and batch_size is not None and batch_size % sharding.num_replicas:
        raise ValueError(
            f"split_batches=True cuts each batch of {batch_size} into {sharding.num_replicas} equal parts, "
            f"which is impossible: use a batch size divisible by {sharding.num_replicas}."
        )
    if isinstance(dataset, IterableDataset):
        if sharding is not None:
            if sharding.split_batches and batch_size is not None:
                batch_size //= sharding.num_replicas
            dataset = _shard_iterable(dataset, batch_size, sharding, loader.drop_last)
        return DataLoader(dataset, batch_size=batch_size, drop_last=loader.drop_last, **kwargs), None
    def seeded(sampler: Any) -> Any:
        """An unseeded RandomSampler replaced by a seeded one (every process must draw the same order)."""
        if type(sampler) is RandomSampler and sampler.generator is None and loader.generator is None:
            return SeedableRandomSampler(sampler.data_source, replacement=sampler.replacement,
                                         num_samples=sampler._num_samples, data_seed=seed)
        if type(sampler) is BatchSampler and seeded(sampler.sampler) is not sampler.sampler:
            return BatchSampler(seeded(sampler.sampler), sampler.batch_size, sampler.drop_last)
        return sampler

    sampler = seeded(loader.sampler)
    if loader.batch_sampler is None:  # batch_size=None: the sampler or the dataset yields whole batches
        index_sampler: Any = sampler
    else:
        index_sampler = loader.batch_sampler
        if type(index_sampler) is BatchSampler and index_sampler.sampler is loader.sampler:
            index_sampler = BatchSampler(sampler, index_sampler.batch_size, loader.drop_last)
        else:  # a batch sampler of the user's own: a plain BatchSampler over a RandomSampler is seeded too
            index_sampler = seeded(index_sampler)
    if sharding is not None:
        index_sampler = ShardedBatchSampler(index_sampler, sharding.num_replicas, sharding.rank,
                                            even_batches=sharding.even_batches, split_batches=sharding.split_batches,
                                            drop_last=loader.drop_last)
    skippable = SkippableSampler(index_sampler)
    if loader.batch_sampler is None:
        return DataLoader(dataset, batch_size=None, sampler=skippable, **kwargs), skippable
    return DataLoader(dataset, batch_sampler=skippable, **kwargs), skippable


class PreparedDataLoader:
    """Iterates like the user's DataLoader; batches arrive on the device; resumable.

    Attribute reads that this class does not define (``dataset``, ``collate_fn``...) go to the
    underlying DataLoader.
    """

    def __init__(self, loader: DataLoader, device: torch.device | None = None,
                 policy: GradientAccumulation | None = None, sharding: Sharding | None = None,
                 agree: Callable[[Any], Any] | None = None, seed: int | None = None, non_blocking: bool = False) -> None:
        self._dispatch = sharding if sharding is not None and sharding.dispatch_batches else None
        self._agree = agree
        self._dispatched_remainder = -1
        self.base_dataloader, self._index_sampler = _rebuild(loader, None if self._dispatch else sharding, seed)
        sampler = self.sampler
        if isinstance(sampler, SeedableRandomSampler):
            sampler.advance_after_pass = False
        if agree is not None and isinstance(sampler, SeededRandomSampler):
            # Every process must shuffle alike, or their shares would overlap: rank 0's seed wins.
            sampler.seed = agree(sampler.seed)
        self.original_dataloader = loader
        # Moving CPU tensors to the CPU is a no-op that still costs a walk of the batch.
        self.device = device if device is not None and device.type != "cpu" else None
        self.non_blocking = non_blocking
        self._policy = policy
        self.iteration = 0  # the epoch: completed passes, or what set_epoch said
        self.position = 0  # batches yielded (or skipped) in the current pass
        self.end_of_dataloader = False
        self._resume_at = 0  # batches the next pass skips (set by load_state_dict)
        self.limit: int | None = None  # batches per pass at most (the Trainer's limit_*_batches)

    def __getattr__(self, name: str) -> Any:
        if name in ("base_dataloader", "original_dataloader"):
            raise AttributeError(name)
        return getattr(self.base_dataloader, name)

    def __len__(self) -> int:
        if self._dispatch is not None:
            length = dispatched_length(len(self.base_dataloader), self._dispatch.num_replicas,
                                       self._dispatch.split_batches)
        else:
            length = len(self.base_dataloader)
        return length if self.limit is None else min(length, self.limit)

    @property
    def batch_size(self) -> int | None:
        return self.original_dataloader.batch_size

    @property
    def batch_sampler(self) -> Any:
        """The batch sampler this process draws from (sharded when there are several), as Accelerate's."""
        if self._index_sampler is None or self.base_dataloader.batch_sampler is None:
            return self.base_dataloader.batch_sampler
        return self._index_sampler.sampler

    @property
    def sampler(self) -> Any:
        return self._index_sampler.base_sampler if self._index_sampler is not None else self.base_dataloader.sampler

    @property
    def remainder(self) -> int:
        """Real samples in the last gathered round of this pass, or -1 when none were padded."""
        if self._dispatch is not None:
            return self._dispatched_remainder
        source = self._index_sampler.sampler if self._index_sampler is not None else self.base_dataloader.dataset
        return getattr(source, "remainder", -1)

    @property
    def remaining(self) -> int | None:
        """Batches still to come in this pass after the current one, or None when unknown."""
        try:
            return len(self) - self.position
        except TypeError:
            return None

    def set_epoch(self, epoch: int) -> None:
        self.iteration = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        skip, self._resume_at = self._resume_at, 0
        return self._iterate(skip=skip)

    def _iterate(self, skip: int) -> Iterator[Any]:
        self._set_sampler_epoch(self.iteration)
        self.end_of_dataloader = False
        self.position = skip
        if self._index_sampler is not None:
            self._index_sampler.skip = skip * (self._batches_per_step() if self._dispatch else 1)
        if self._policy is not None:
            self._policy.push_dataloader(self)
        try:
            iterator = self._open(skip)
            if self._index_sampler is None and skip:
                warnings.warn(
                    f"Resuming {skip} batches into an iterable dataset: its batches cannot be skipped "
                    "without reading them, so they are read and dropped.", stacklevel=2)
                for _ in range(skip):
                    next(iterator, None)
            if self.limit is not None:  # the pass ends after `limit` batches: the last one is its end
                iterator = itertools.islice(iterator, max(0, self.limit - skip))
            try:
                upcoming = next(iterator)
            except StopIteration:
                self.end_of_dataloader = True
                self.iteration += 1
                self.position = 0
                return
            while True:
                current = upcoming
                try:
                    upcoming = next(iterator)
                except StopIteration:
                    self.end_of_dataloader = True
                self.position += 1
                yield current if self.device is None else send_to_device(current, self.device, self.non_blocking)
                if self.end_of_dataloader:
                    break
            # The pass is complete: the next one is a new epoch that has not started yet.
            self.iteration += 1
            self.position = 0
        finally:
            if self._policy is not None:
                self._policy.pop_dataloader(self)

    def _batches_per_step(self) -> int:
        assert self._dispatch is not None
        return 1 if self._dispatch.split_batches else self._dispatch.num_replicas

    def _open(self, skip: int) -> Iterator[Any]:
        """An iterator over this process's batches of one pass (process 0 reads for all when dispatching)."""
        source: Iterator[Any] | None = None
        if self._dispatch is None or self._dispatch.rank == 0:
            if skip:
                # Creating an iterator draws the workers' base seed from the global RNG. The run
                # being resumed drew it at the start of this epoch, before the checkpoint saved
                # the RNG state, so drawing it again here would shift every later random number.
                with torch.random.fork_rng(devices=[]):
                    source = iter(self.base_dataloader)
            else:
                source = iter(self.base_dataloader)
        if self._dispatch is None:
            assert source is not None
            return source
        if self._agree is None:
            raise ValueError("dispatch_batches=True needs a way to send batches from process 0 (agree=).")
        self._dispatched_remainder = -1

        def remember(real: int) -> None:
            self._dispatched_remainder = real

        return dispatched_batches(source, self._dispatch.num_replicas, self._dispatch.rank,
                                  self._dispatch.split_batches, self._dispatch.even_batches, self._agree, remember,
                                  self._dispatch.slice_fn)

    def _set_sampler_epoch(self, epoch: int) -> None:
        if self._index_sampler is not None:
            self._index_sampler.set_epoch(epoch)
        elif hasattr(self.base_dataloader.dataset, "set_epoch"):
            self.base_dataloader.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: the epoch, the batches consumed in it, the shuffle seed."""
        state: dict[str, Any] = {"iteration": self.iteration, "position": self.position}
        sampler = self.sampler
        if hasattr(sampler, "state_dict"):
            state["sampler"] = sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], resume: bool = True) -> None:
        """Go back to ``state``: its epoch, its shuffle and (with ``resume``) its place in the epoch.

        With ``resume`` the next pass starts where the state was taken, as a stateful loader does;
        ``accelerator.load_state`` resumes so only with ``use_stateful_dataloader=True`` (otherwise the
        loop skips the done batches itself with ``skip_first_batches``). An explicit
        ``skip_first_batches`` always wins.
        """
        self.iteration = int(state["iteration"])
        self.position = int(state.get("position", 0))
        self._resume_at = self.position if resume else 0
        sampler = self.sampler
        if "sampler" in state and hasattr(sampler, "load_state_dict"):
            sampler.load_state_dict(state["sampler"])


class SkipFirstBatches:
    """One pass of a prepared loader that starts ``num_batches`` in (see ``skip_first_batches``)."""

    def __init__(self, loader: PreparedDataLoader, num_batches: int) -> None:
        self.loader = loader
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[Any]:
        self.loader._resume_at = 0  # an explicit skip replaces a pending resume
        return self.loader._iterate(skip=self.num_batches)

    def __len__(self) -> int:
        return max(0, len(self.loader) - self.num_batches)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def skip_first_batches(dataloader: Any, num_batches: int = 0) -> SkipFirstBatches:
    """One pass of ``dataloader`` that starts ``num_batches`` in, without loading the skipped batches.

    ``dataloader`` is a prepared loader or a plain ``DataLoader`` (prepared here without sharding).
    The pass belongs to the loader's current epoch, so the next ``for batch in dataloader`` is the
    following epoch.
    """
    if not isinstance(dataloader, PreparedDataLoader):
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"skip_first_batches needs a DataLoader, got {type(dataloader).__name__}.")
        from trainer.accelerator_state import current_accelerator

        accelerator = current_accelerator()
        dataloader = PreparedDataLoader(dataloader, None, accelerator.accumulation if accelerator else None)
    return SkipFirstBatches(dataloader, num_batches)


def prepare_data_loader(dataloader: DataLoader, device: torch.device | None = None, num_processes: int | None = None,
                        process_index: int | None = None, split_batches: bool = False, put_on_device: bool = False,
                        rng_types: list[str] | None = None, dispatch_batches: bool | None = None,
                        even_batches: bool = True, slice_fn_for_dispatch: Callable[..., Any] | None = None,
                        use_seedable_sampler: bool = False, data_seed: int | None = None, non_blocking: bool = False,
                        use_stateful_dataloader: bool = False, torch_device_mesh: Any = None) -> PreparedDataLoader:
    """``dataloader`` prepared for this process, without an Accelerator (Accelerate's module-level function).

    The share is process ``process_index`` of ``num_processes`` (by default this process of the
    job). Shuffling is always seeded here (``data_seed``, else the torch seed of process 0), so
    ``use_seedable_sampler`` and ``rng_types`` change nothing; ``use_stateful_dataloader`` neither (a
    prepared loader always has ``state_dict``).
    """
    from trainer.accelerator_state import current_accelerator
    from trainer.state import PartialState
    from trainer.utils.operations import broadcast_object_list

    if torch_device_mesh is not None:
        raise ValueError("prepare_data_loader(torch_device_mesh=...): sharding by a device mesh is the strategy's "
                         "job here; prepare the loader with accelerator.prepare instead.")
    state = PartialState()
    num_processes = state.num_processes if num_processes is None else num_processes
    process_index = state.process_index if process_index is None else process_index
    sharding = Sharding(num_processes, process_index, even_batches, split_batches,
                        bool(dispatch_batches), slice_fn_for_dispatch) if num_processes > 1 else None
    accelerator = current_accelerator()

    def agree(seed: Any) -> Any:
        return broadcast_object_list([seed])[0] if state.num_processes > 1 else seed

    return PreparedDataLoader(dataloader, (device or state.device) if put_on_device else None,
                              accelerator.accumulation if accelerator is not None else None, sharding=sharding,
                              agree=agree, seed=data_seed, non_blocking=non_blocking)


class BatchSamplerShard(ShardedBatchSampler):
    """``ShardedBatchSampler`` with Accelerate's argument names (``num_processes``, ``process_index``)."""

    def __init__(self, batch_sampler: Any, num_processes: int = 1, process_index: int = 0, split_batches: bool = False,
                 even_batches: bool = True) -> None:
        super().__init__(batch_sampler, num_processes, process_index, even_batches=even_batches,
                         split_batches=split_batches, drop_last=bool(getattr(batch_sampler, "drop_last", False)))


class IterableDatasetShard(ItemShard):
    """``trainer.data_sharding.IterableDatasetShard`` with Accelerate's argument names and order."""

    def __init__(self, dataset: Any, batch_size: int = 1, drop_last: bool = False, num_processes: int = 1,
                 process_index: int = 0, split_batches: bool = False) -> None:
        if split_batches:
            if batch_size % num_processes:
                raise ValueError(f"IterableDatasetShard(split_batches=True) needs a batch_size ({batch_size}) "
                                 f"divisible by num_processes ({num_processes}).")
            batch_size //= num_processes
        super().__init__(dataset, batch_size, num_processes, process_index, drop_last=drop_last)
