"""Prediction outputs written to disk batch by batch, for outputs too large to hold at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def flatten_outputs(outputs: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested output (dicts, tuples, model outputs) under dotted names: ``logits``, ``hidden.0``."""
    if torch.is_tensor(outputs):
        return {prefix or "output": outputs.detach().to("cpu").contiguous()}
    if isinstance(outputs, Mapping) or hasattr(outputs, "items"):
        items = outputs.items()
    elif isinstance(outputs, (tuple, list)):
        items = enumerate(outputs)
    elif outputs is None:
        return {}
    else:
        raise TypeError("Outputs written to disk must be tensors (or dicts, tuples, lists of them); "
                        f"got {type(outputs).__name__}.")
    flat: dict[str, torch.Tensor] = {}
    for key, value in items:
        flat.update(flatten_outputs(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def save_outputs(outputs: Any, directory: str | os.PathLike, index: int) -> Path:
    """Write one batch's outputs as ``batch_<index>.safetensors`` in ``directory``; returns the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"batch_{index:06d}.safetensors"
    save_file(flatten_outputs(outputs), str(path))
    return path


def load_outputs(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One batch's outputs as written by ``save_outputs`` (flat, dotted names)."""
    return load_file(str(path))
