"""Sharding rules, checked rank by rank without processes: what each of N ranks would receive."""

from __future__ import annotations

import pytest
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

from trainer.data_loader import PreparedDataLoader, Sharding
from trainer.data_sharding import IterableDatasetShard, ShardedBatchSampler


def dealt(samples: int, batch: int, ranks: int, **options):
    batches = BatchSampler(SequentialSampler(range(samples)), batch, options.get("drop_last", False))
    shards = [ShardedBatchSampler(batches, ranks, rank, **options) for rank in range(ranks)]
    return [list(shard) for shard in shards], shards[0]


def interleave(per_rank):
    return [item for round_ in zip(*per_rank, strict=True) for batch in round_ for item in batch]


@pytest.mark.parametrize("samples", [96, 97, 101, 104, 8, 3])
def test_even_batches_pad_and_remainder_recovers_exactly_the_data(samples):
    per_rank, shard = dealt(samples, 8, 2)
    assert len({len(batches) for batches in per_rank}) == 1  # every rank steps equally often
    assert len(per_rank[0]) == len(shard)
    gathered = interleave(per_rank)
    real = gathered if shard.remainder < 0 else gathered[:len(gathered) - 2 * 8 + shard.remainder]
    assert real == list(range(samples))


def test_batches_are_dealt_in_turn():
    per_rank, _ = dealt(32, 4, 2)
    assert per_rank[0][:2] == [[0, 1, 2, 3], [8, 9, 10, 11]] and per_rank[1][:2] == [[4, 5, 6, 7], [12, 13, 14, 15]]


def test_uneven_batches_when_asked():
    per_rank, _ = dealt(20, 4, 3, even_batches=False)
    assert [len(b) for b in per_rank] == [2, 2, 1]
    assert per_rank[1][-1] == [16, 17, 18, 19]


def test_drop_last_drops_the_incomplete_round():
    per_rank, _ = dealt(21, 4, 2, drop_last=True)
    assert per_rank == [[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7], [12, 13, 14, 15]]]


def test_split_batches_cuts_every_batch():
    per_rank, shard = dealt(22, 8, 2, split_batches=True)  # the last batch of 6 still divides in two
    assert per_rank[0] == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18]]
    assert per_rank[1] == [[4, 5, 6, 7], [12, 13, 14, 15], [19, 20, 21]]
    assert shard.remainder == -1
    per_rank, shard = dealt(21, 8, 2, split_batches=True)  # a last batch of 5 is completed to 6
    assert per_rank[1][-1] == [19, 20, 0] and shard.remainder == 5


def test_split_batches_needs_a_divisible_batch_size():
    with pytest.raises(ValueError, match="use a batch size divisible by 2"):
        PreparedDataLoader(DataLoader(range(10), batch_size=5), sharding=Sharding(2, 0, split_batches=True))


class Numbers(IterableDataset):
    def __iter__(self):
        yield from range(21)


def test_plain_iterables_are_cut_into_per_rank_chunks_and_padded():
    shards = [IterableDatasetShard(Numbers(), 4, 2, rank) for rank in range(2)]
    assert list(shards[0]) == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    assert list(shards[1]) == [4, 5, 6, 7, 12, 13, 14, 15, 20, 0, 1, 2]
    assert shards[1].remainder == 5


def test_prepared_loaders_shard_plain_and_hugging_face_iterables():
    from datasets import Dataset

    loaders = [PreparedDataLoader(DataLoader(Numbers(), batch_size=4), sharding=Sharding(2, rank)) for rank in range(2)]
    assert [b.tolist() for b in loaders[1]] == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 0, 1, 2]]
    assert loaders[1].remainder == 5
    streamed = Dataset.from_dict({"x": list(range(10))}).to_iterable_dataset(num_shards=2)
    parts = [[row["x"].item() for row in PreparedDataLoader(DataLoader(streamed, batch_size=1), sharding=Sharding(2, rank))]
             for rank in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(10)) and not set(parts[0]) & set(parts[1])
