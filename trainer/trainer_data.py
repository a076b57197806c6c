"""Turn what the user passed as data (a Dataset, a ``datasets.Dataset``, a DataLoader) into a DataLoader."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset


def build_dataloader(data: Any, batch_size: int, shuffle: bool, collate_fn: Callable | None,
                     num_workers: int, private_rng: bool = False) -> DataLoader:
    """A DataLoader over ``data``; a DataLoader passes through unchanged.

    ``private_rng`` gives the loader its own generator, so iterating it (validation, prediction)
    does not draw from the global RNG that training's dropout and shuffling use.
    """
    if isinstance(data, DataLoader):
        return data
    if not hasattr(data, "__getitem__") and not isinstance(data, IterableDataset) and not hasattr(data, "__iter__"):
        raise TypeError(
            f"Cannot build a DataLoader from a {type(data).__name__}: pass a torch Dataset, a datasets.Dataset, "
            "or a DataLoader."
        )
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        shuffle = False  # an iterable has no indices to shuffle
    generator = torch.Generator().manual_seed(0) if private_rng else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn,
                      num_workers=num_workers, generator=generator)
