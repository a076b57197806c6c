"""The checkpoint state format: tensors in safetensors, everything else in JSON, nothing pickled.

A state dict is split into its tensors (stored by a flat key in a ``.safetensors`` file) and a
JSON skeleton that records where each tensor goes, so that a checkpoint from an untrusted source
cannot run code when it is loaded. It lives here, below both ``trainer`` and the strategies,
because strategies that write their own (sharded) checkpoints use the same format.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

_TENSOR, _TUPLE, _ITEMS, _FLOAT = "__tensor__", "__tuple__", "__items__", "__float__"


def split_state(state: Any, prefix: str = "", materialize: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-ready skeleton, flat dict of tensors) for a nested state dict.

    Tensors are stored under their dotted path (after ``prefix``). ``materialize`` gives plain,
    contiguous CPU copies; without it tensors keep their type, so a sharded ``DTensor`` stays one
    and a distributed writer stores each process's shard.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if torch.is_tensor(obj):
            key = path or "tensor"
            tensors[key] = obj.detach().contiguous().cpu() if materialize else obj
            return {_TENSOR: key}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            # Optimizer states are keyed by int; JSON would turn those keys into strings.
            return {_ITEMS: [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
        if isinstance(obj, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, float) and not math.isfinite(obj):
            return {_FLOAT: repr(obj)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(
            f"Cannot store a {type(obj).__name__} at {path or 'the top level'} in a checkpoint: only "
            "tensors, numbers, strings, None, lists, tuples and dicts are saved (nothing is pickled)."
        )

    return walk(state, prefix), tensors


def join_state(skeleton: Any, tensors: dict[str, Any]) -> Any:
    """The inverse of ``split_state`` (``open_state`` puts ``StoredTensor`` handles where the tensors go)."""
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if _TUPLE in skeleton:
            return tuple(join_state(v, tensors) for v in skeleton[_TUPLE])
        if _ITEMS in skeleton:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in skeleton[_ITEMS]}
        if _FLOAT in skeleton:
            return float(skeleton[_FLOAT])
        return {k: join_state(v, tensors) for k, v in skeleton.items()}
    return skeleton


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """Parse a JSON file."""
    return json.loads(path.read_text())


def save_state_files(state: Any, directory: Path, name: str) -> None:
    """Write ``name.json`` (and ``name.safetensors`` when there are tensors) into ``directory``."""
    write_split_state(*split_state(state), directory, name)


def write_split_state(skeleton: Any, tensors: dict[str, torch.Tensor], directory: Path, name: str) -> None:
    """Write what ``split_state`` returned as ``save_state_files`` does."""
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", skeleton)


def load_state_files(directory: Path, name: str, device: torch.device | str = "cpu") -> Any:
    """Read what ``save_state_files`` wrote; a missing file or tensor is one error naming the file."""
    skeleton = _read_skeleton(directory, name)
    return join_state(skeleton, _read_tensors(directory, name, tensor_keys(skeleton), device))


class StoredTensor:
    """A tensor of a state ``open_state`` opened: read when asked, and only the part asked for."""

    def __init__(self, handle: Any, key: str) -> None:
        self._handle, self.key = handle, key
        self._slice = handle.get_slice(key)  # the file's view of the tensor, read from in parts
        self.shape = torch.Size(self._slice.get_shape())

    def read(self) -> torch.Tensor:
        """The whole tensor."""
        return self._handle.get_tensor(self.key)

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Values ``start:stop`` of a one-dimensional tensor: only those bytes are read."""
        if len(self.shape) != 1:
            raise ValueError(f"read_range reads a one-dimensional tensor; {self.key} has the shape {tuple(self.shape)}.")
        return self._slice[start:stop]


@contextmanager
def open_state(directory: Path, name: str) -> Iterator[Any]:
    """What ``save_state_files`` wrote, with a ``StoredTensor`` where each tensor goes: nothing is read until
    asked for, so a process takes only its part of a large state. The file stays open inside the ``with``."""
    skeleton = _read_skeleton(directory, name)
    keys = tensor_keys(skeleton)
    if not keys:
        yield join_state(skeleton, {})
        return
    tensor_path = _tensor_file(directory, name)
    with safe_open(str(tensor_path), "pt", device="cpu") as handle:
        _check_held(directory, name, keys, set(handle.keys()))
        yield join_state(skeleton, {key: StoredTensor(handle, key) for key in keys})


def read_stored(state: Any) -> Any:
    """``state`` (from ``open_state``) with every ``StoredTensor`` read into a tensor."""
    if isinstance(state, StoredTensor):
        return state.read()
    if isinstance(state, dict):
        return {key: read_stored(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(read_stored(value) for value in state)
    return state


def load_state_entries(directory: Path, name: str, entry: str, keys: list[str] | None = None) -> dict[str, Any]:
    """Only ``entry`` (a key of the saved mapping), and of it only ``keys`` when given, of what ``save_state_files``
    wrote: the other tensors of the file are not read."""
    skeleton = _read_skeleton(directory, name).get(entry, {})
    if keys is not None:
        skeleton = {key: skeleton[key] for key in keys if key in skeleton}
    return join_state(skeleton, _read_tensors(directory, name, tensor_keys(skeleton), "cpu"))


def _read_skeleton(directory: Path, name: str) -> Any:
    json_path = directory / f"{name}.json"
    if not json_path.is_file():
        raise FileNotFoundError(
            f"The checkpoint {directory} has no {json_path.name}: it is incomplete or was written by a "
            "different setup (another number of models, optimizers or processes)."
        )
    try:
        skeleton = read_json(json_path)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"The checkpoint {directory} has a damaged {json_path.name}: it is not valid JSON ({error}). "
                         "Load an earlier checkpoint, or save this one again.") from None
    return skeleton


def _read_tensors(directory: Path, name: str, wanted: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors ``wanted`` of ``name.safetensors`` (the whole file in one read when it is all of them)."""
    if not wanted:
        return {}
    tensor_path = _tensor_file(directory, name)
    with safe_open(str(tensor_path), "pt", device=str(device)) as handle:
        held = set(handle.keys())
        _check_held(directory, name, wanted, held)
        if len(wanted) < len(held):
            return {key: handle.get_tensor(key) for key in wanted}
    return load_file(str(tensor_path), device=str(device))


def _tensor_file(directory: Path, name: str) -> Path:
    tensor_path = directory / f"{name}.safetensors"
    if not tensor_path.is_file():
        raise FileNotFoundError(f"The checkpoint {directory} has no {tensor_path.name}, which holds the tensors of "
                                f"{name}.json: it is incomplete. Load an earlier checkpoint.")
    return tensor_path


def _check_held(directory: Path, name: str, wanted: list[str], held: set[str]) -> None:
    absent = [key for key in wanted if key not in held]
    if absent:
        raise ValueError(f"The checkpoint {directory} is inconsistent: {name}.json refers to tensors that "
                         f"{name}.safetensors does not hold ({absent[:10]}). Load an earlier checkpoint.")


def tensor_keys(skeleton: Any) -> list[str]:
    """The tensor keys a skeleton refers to, in order."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, dict):
            if _TENSOR in node:
                found.append(node[_TENSOR])
            else:
                for value in node.values():
                    walk(value)

    walk(skeleton)
    return found


def tensor_ref(key: str) -> dict[str, str]:
    """The skeleton entry that stands for the tensor stored under ``key``."""
    return {_TENSOR: key}


def is_tensor_ref(node: Any) -> bool:
    return isinstance(node, dict) and _TENSOR in node
