"""Turn what the user passed as data into a DataLoader.

Accepted: a torch Dataset or IterableDataset, a ``datasets.Dataset`` or ``datasets.IterableDataset``
(given the torch format unless it already has one, so batches arrive as tensors), or a
DataLoader (used as it is). Tokenised examples (dicts with ``input_ids``) get a padding
collator unless a ``collate_fn`` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from trainer.collate import PaddingCollator, needs_padding


def build_dataloader(data: Any, batch_size: int, shuffle: bool, collate_fn: Callable | None,
                     num_workers: int, private_rng: bool = False, pad_token_id: int = 0) -> DataLoader:
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
    data = with_torch_format(data)
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        shuffle = False  # an iterable has no indices to shuffle
    if collate_fn is None and needs_padding(_first_example(data)):
        collate_fn = PaddingCollator(pad_token_id=pad_token_id)
    generator = torch.Generator().manual_seed(0) if private_rng else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn,
                      num_workers=num_workers, generator=generator)


def is_hf_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("datasets.") and hasattr(data, "with_format")


def with_torch_format(data: Any) -> Any:
    """A ``datasets`` dataset in the torch format (one that already has a format keeps it)."""
    if is_hf_dataset(data) and getattr(data, "format", {}).get("type") is None and _format_type(data) is None:
        return data.with_format("torch")
    return data


def _format_type(data: Any) -> Any:
    formatting = getattr(data, "_formatting", None)  # datasets.IterableDataset keeps its format here
    return getattr(formatting, "format_type", None)


def _first_example(data: Any) -> Any:
    """The first example of a map-style dataset (None for iterables: reading one would consume it)."""
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__") or len(data) == 0:
        return _peek_iterable(data)
    try:
        return data[0]
    except (KeyError, IndexError, TypeError):
        return None


def _peek_iterable(data: Any) -> Any:
    """A ``datasets.IterableDataset``'s first example (it restarts on each iteration), else None."""
    if not is_hf_dataset(data):
        return None
    return next(iter(data), None)


def pad_token_id(model: nn.Module, tokenizer: Any) -> int:
    """The pad token: the tokenizer's, else the model config's, else 0."""
    for source in (tokenizer, getattr(model, "config", None)):
        value = getattr(source, "pad_token_id", None)
        if isinstance(value, int):
            return value
    return 0
