"""``Accelerator.save_model``'s files: one ``model.safetensors``, or shards with an index, as Hugging Face writes them.

A model whose weights fit in ``max_shard_size`` is written by the strategy as one safetensors file
(gathered first where the strategy shards it; tied weights once). A larger one, or any model with
``safe_serialization=False``, is gathered onto the main process and written by
``huggingface_hub.save_torch_state_dict``: ``model-00001-of-0000N.safetensors`` and
``model.safetensors.index.json`` (``pytorch_model*.bin`` with pickle, as Accelerate writes when
asked), which ``load_checkpoint_in_model`` and ``from_pretrained`` read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.inference.sizes import parse_size

if TYPE_CHECKING:
    from trainer.strategies import Strategy


def shard_size_bytes(max_shard_size: int | str) -> int:
    """``max_shard_size`` in bytes: a whole number, or a size such as ``"10GB"``, ``"500MB"``, ``"2GiB"``."""
    try:
        size = parse_size(max_shard_size)
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(f"save_model(max_shard_size={max_shard_size!r}): give a number of bytes or a size such as "
                         "'10GB', '500MB' or '2GiB'.")
    return size


def weight_bytes(module: nn.Module) -> int:
    """The bytes of the module's weights (each shared tensor once; DTensors at their full size, other strategies'
    shards at their local size, so a model sharded that way is split into files by its local bytes)."""
    seen: set[int] = set()
    total = 0
    for tensor in module.state_dict().values():
        if not isinstance(tensor, torch.Tensor):  # extra states (Megatron's, TransformerEngine's) hold no weights
            continue
        key = tensor.data_ptr() if type(tensor) is torch.Tensor and tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def writes_whole_weights(strategy: Strategy) -> bool:
    """Whether the strategy saves a model as process 0's own ``state_dict`` (its ``save_module`` is the base one):
    nothing to gather, so process 0 may save alone."""
    from trainer.strategies.base import Strategy

    return type(strategy).save_module is Strategy.save_module


def write_model_files(strategy: Strategy, model: nn.Module, directory: Path, max_shard_size: int | str,
                      safe_serialization: bool) -> Path:
    """Write the model's weights into ``directory`` (on every process; the main one writes). Returns the file
    to point loaders at: ``model.safetensors``, or the shards' index."""
    limit = shard_size_bytes(max_shard_size)
    sharded = weight_bytes(strategy.unwrap_module(model)) > limit
    if not writes_whole_weights(strategy):  # the processes gather together: they take process 0's decision
        sharded = strategy.broadcast_object(sharded)
    if safe_serialization and not sharded:
        path = directory / "model.safetensors"
        strategy.save_module(model, path)
        return path
    from huggingface_hub import save_torch_state_dict

    state = strategy.full_state_dict(model)  # gathered onto the main process where the strategy shards it
    if strategy.process_index == 0:
        save_torch_state_dict(state, directory, max_shard_size=limit, safe_serialization=safe_serialization)
    name = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    return directory / (f"{name}.index.json" if sharded else name)
