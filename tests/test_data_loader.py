"""Prepared data loaders: same batches, resumable order, look-ahead, cheap skipping."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from trainer import Accelerator, PreparedDataLoader, SeededRandomSampler


class Counted(Dataset):
    """Records every index that is loaded."""

    def __init__(self, size: int) -> None:
        self.size, self.loaded = size, []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        self.loaded.append(index)
        return torch.tensor(index)


def batches(loader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def test_unshuffled_batches_are_the_plain_loaders():
    loader = DataLoader(Counted(10), batch_size=3)
    prepared = Accelerator().prepare(loader)
    assert isinstance(prepared, PreparedDataLoader)
    assert batches(prepared) == batches(loader) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert len(prepared) == 4 and prepared.batch_size == 3 and prepared.dataset is loader.dataset


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    torch.manual_seed(5)
    first = Accelerator().prepare(DataLoader(Counted(12), batch_size=4, shuffle=True))
    torch.manual_seed(5)
    second = Accelerator().prepare(DataLoader(Counted(12), batch_size=4, shuffle=True))
    assert isinstance(first.sampler, SeededRandomSampler) and first.sampler.seed == 5
    epoch0, epoch1 = batches(first), batches(first)
    assert sorted(sum(epoch0, [])) == list(range(12))
    assert epoch0 != epoch1  # a new permutation each epoch
    assert batches(second) == epoch0 and batches(second) == epoch1
    second.set_epoch(0)
    assert batches(second) == epoch0
    generator = torch.Generator().manual_seed(5 + 1)
    assert sum(epoch1, []) == torch.randperm(12, generator=generator).tolist()


def test_end_of_dataloader_is_known_on_the_last_batch():
    accelerator = Accelerator()
    prepared = accelerator.prepare(DataLoader(Counted(7), batch_size=2))
    seen = [(prepared.end_of_dataloader, prepared.remaining, accelerator.accumulation.end_of_dataloader)
            for _ in prepared]
    assert seen == [(False, 3, False), (False, 2, False), (False, 1, False), (True, 0, True)]
    assert prepared.iteration == 1
    assert accelerator.accumulation.active_dataloader is None


def test_skip_first_batches_does_not_load_the_skipped_samples():
    dataset = Counted(10)
    accelerator = Accelerator()
    prepared = accelerator.prepare(DataLoader(dataset, batch_size=2))
    resumed = accelerator.skip_first_batches(prepared, 3)
    assert len(resumed) == 2
    assert batches(resumed) == [[6, 7], [8, 9]]
    assert dataset.loaded == [6, 7, 8, 9]
    assert prepared.iteration == 1  # the skipped pass was epoch 0; next comes epoch 1
    assert batches(prepared) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_skip_first_batches_keeps_the_epochs_shuffle():
    torch.manual_seed(0)
    accelerator = Accelerator()
    prepared = accelerator.prepare(DataLoader(Counted(12), batch_size=3, shuffle=True))
    full = batches(prepared)  # epoch 0
    prepared.set_epoch(0)
    assert batches(accelerator.skip_first_batches(prepared, 2)) == full[2:]


def test_skip_first_batches_of_a_plain_dataloader():
    loader = DataLoader(Counted(6), batch_size=2)
    assert batches(Accelerator().skip_first_batches(loader, 1)) == [[2, 3], [4, 5]]


class Stream(IterableDataset):
    def __iter__(self):
        yield from (torch.tensor(i) for i in range(5))


def test_iterable_datasets_have_no_known_remainder_and_skip_by_reading():
    accelerator = Accelerator()
    prepared = accelerator.prepare(DataLoader(Stream(), batch_size=2))
    seen = [(b.tolist(), prepared.remaining, prepared.end_of_dataloader) for b in prepared]
    assert seen == [([0, 1], None, False), ([2, 3], None, False), ([4], None, True)]
    with pytest.warns(UserWarning, match="cannot be skipped without reading them"):
        assert batches(accelerator.skip_first_batches(prepared, 2)) == [[4]]


def test_loader_without_automatic_batching():
    data = TensorDataset(torch.arange(6).view(3, 2))
    prepared = Accelerator().prepare(DataLoader(data, batch_size=None))
    assert [b[0].tolist() for b in prepared] == [[0, 1], [2, 3], [4, 5]]
    assert [b[0].tolist() for b in Accelerator().skip_first_batches(prepared, 2)] == [[4, 5]]


def test_worker_processes_and_collate_fn_are_kept():
    def collate(rows):
        return torch.stack(rows) * 10

    loader = DataLoader(Counted(8), batch_size=4, num_workers=2, collate_fn=collate)
    prepared = Accelerator().prepare(loader)
    assert prepared.num_workers == 2
    assert batches(prepared) == [[0, 10, 20, 30], [40, 50, 60, 70]]


def test_state_dict_round_trip():
    torch.manual_seed(3)
    prepared = Accelerator().prepare(DataLoader(Counted(8), batch_size=2, shuffle=True))
    batches(prepared)
    state = prepared.state_dict()
    assert state == {"iteration": 1, "position": 0, "sampler": {"seed": 3, "epoch": 0}}
    torch.manual_seed(99)
    other = Accelerator().prepare(DataLoader(Counted(8), batch_size=2, shuffle=True))
    other.load_state_dict(state)
    assert batches(other) == batches(prepared)
