"""Batching tokenised examples: sequences of different lengths are padded to the longest in the batch.

Used by default when the examples are dicts with ``input_ids`` and no ``collate_fn`` was given.
Padding values follow the transformers conventions: the pad token for ``input_ids``, 0 for
masks and token types, -100 (ignored by the loss) for per-token ``labels``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

LABEL_PAD = -100


class PaddingCollator:
    """Pad the 1-D sequence fields of dict examples to the batch's longest; other fields use ``default_collate``.

    Args:
        pad_token_id: the value ``input_ids`` are padded with (a tokenizer's ``pad_token_id``).
        padding_side: ``"right"`` (default) or ``"left"`` (for generation with decoder-only models).
        pad_to_multiple_of: round the padded length up (tensor cores like multiples of 8).
    """

    def __init__(self, pad_token_id: int = 0, padding_side: str = "right", pad_to_multiple_of: int | None = None) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r}: use 'right' or 'left'.")
        self.pad_token_id, self.padding_side, self.pad_to_multiple_of = pad_token_id, padding_side, pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in examples[0]:
            values = [example[key] for example in examples]
            if _is_sequence(values[0]):
                batch[key] = self._pad([torch.as_tensor(v) for v in values], self._pad_value(key))
            else:
                batch[key] = default_collate(values)
        return batch

    def _pad_value(self, key: str) -> int:
        if key in ("labels", "label_ids"):
            return LABEL_PAD
        if key.endswith("input_ids"):
            return self.pad_token_id
        return 0

    def _pad(self, sequences: list[torch.Tensor], value: int) -> torch.Tensor:
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(sequences), length), value, dtype=sequences[0].dtype)
        for row, sequence in enumerate(sequences):
            if self.padding_side == "right":
                out[row, : len(sequence)] = sequence
            else:
                out[row, length - len(sequence):] = sequence
        return out


def _is_sequence(value: Any) -> bool:
    if torch.is_tensor(value):
        return value.dim() == 1
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], (int, float, bool))


def needs_padding(example: Any) -> bool:
    """Whether an example is a tokenised dict (has ``input_ids``), whose batches need padding."""
    return isinstance(example, Mapping) and "input_ids" in example
