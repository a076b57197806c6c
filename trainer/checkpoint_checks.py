"""Everything ``load_state`` checks before it changes any state, and the reading of what it checked.

Each JSON file is parsed and its structure checked; each safetensors file's header is read and
checked against the file's size; a model's keys and shapes are compared with the prepared model's;
every tensor a JSON skeleton refers to must be in its safetensors file. Whatever is wrong is one
error naming the checkpoint, the file (and the keys) and the fix, raised before the first object
is restored. The parsed JSON is kept, so the restoring that follows reads each file once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from trainer.checkpoint_errors import CheckpointError, CheckpointFileNotFoundError, CheckpointKeysError
from trainer.inference.checkpoint_shards import TensorInfo, listing, read_safetensors_header
from trainer.strategies.state_format import join_state, tensor_keys

# The folders a strategy that keeps its own format writes (and the strategy that writes each).
OWN_FORMAT_FOLDERS = {"sharded_state": "fsdp", "zero": "deepspeed", "deepspeed": "deepspeed", "megatron": "megatron"}
COUNTED = ("models", "optimizers", "schedulers", "dataloaders", "custom_objects")
_EARLIER = "Load an earlier checkpoint"
_KEYS_SHOWN = 10


def _keys(keys: list[str]) -> str:
    """A list of keys as Python writes it, cut to the first few for models with thousands."""
    return repr(keys) if len(keys) <= _KEYS_SHOWN else f"[{listing([repr(k) for k in keys], _KEYS_SHOWN)}]"


def missing_file(source: Path, name: str) -> CheckpointFileNotFoundError:
    """The error for a file the checkpoint should hold and does not."""
    return CheckpointFileNotFoundError(f"The checkpoint {source} has no {name}: it is incomplete or was written by a "
                                       f"different setup. {_EARLIER}, or prepare the same objects as the run that saved it.")


def damaged(source: Path, name: str, what: str) -> CheckpointError:
    """The error for a file that is there but cannot be what ``save_state`` wrote."""
    return CheckpointError(f"The checkpoint {source} has a damaged {name}: {what}. {_EARLIER}, or save this one again.")


def read_json_file(source: Path, name: str) -> Any:
    """A JSON file of the checkpoint, parsed; a missing or malformed file is one error naming it."""
    path = source / name
    if not path.is_file():
        raise missing_file(source, name)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(source, name, f"it is not valid JSON ({error})") from None


def read_state_json(source: Path, name: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A state dict's JSON skeleton: an object, holding the ``required`` keys."""
    skeleton = read_json_file(source, name)
    if not isinstance(skeleton, dict):
        raise damaged(source, name, f"it holds a JSON {type(skeleton).__name__}, where a state dict (an object) belongs")
    absent = [key for key in required if key not in skeleton]
    if absent:
        raise damaged(source, name, f"it has no {', '.join(map(repr, absent))} entry, which every such state holds")
    return skeleton


def read_info(source: Path) -> dict[str, Any]:
    """``accelerator.json``, with the structure ``load_state`` relies on checked."""
    info = read_state_json(source, "accelerator.json", ("counts",))
    counts = info["counts"]
    if not (isinstance(counts, dict) and all(isinstance(counts.get(kind), int) and counts[kind] >= 0 for kind in COUNTED)):
        raise damaged(source, "accelerator.json", f"its 'counts' must give a number for each of {', '.join(COUNTED)} "
                                                  f"(it is {json.dumps(counts)[:200]})")
    if not isinstance(info.get("accumulation", {}), dict) or not isinstance(info.get("save_iteration", 0), int):
        raise damaged(source, "accelerator.json", "its 'accumulation' must be an object and its 'save_iteration' a number")
    return info


def safetensors_header(source: Path, name: str) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a safetensors file, after checking the header against the file's size."""
    path = source / name
    if not path.is_file():
        raise missing_file(source, name)
    try:
        return read_safetensors_header(path).tensors
    except CheckpointError as error:
        raise CheckpointError(f"The checkpoint {source} cannot be loaded: {error} {_EARLIER}, or save this one "
                              "again.") from None


def check_tensor_refs(source: Path, name: str, skeleton: Any) -> None:
    """Every tensor ``name.json`` refers to is in ``name.safetensors``."""
    wanted = tensor_keys(skeleton)
    if not wanted:
        return
    header = safetensors_header(source, f"{name}.safetensors")
    absent = [key for key in wanted if key not in header]
    if absent:
        raise CheckpointError(f"The checkpoint {source} is inconsistent: {name}.json refers to tensors that "
                              f"{name}.safetensors does not hold: {_keys(absent)}. {_EARLIER}, or save this one again.")


def load_checked_state(source: Path, name: str, skeleton: Any, device: torch.device | str = "cpu") -> Any:
    """The state ``check_tensor_refs`` checked, with its tensors read."""
    tensor_path = source / f"{name}.safetensors"
    tensors = load_file(str(tensor_path), device=str(device)) if tensor_keys(skeleton) else {}
    return join_state(skeleton, tensors)


# -- models ---------------------------------------------------------------------------------------------------------
def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _tied_groups(state: dict[str, Any]) -> dict[str, set[str]]:
    """Each key -> the keys sharing its memory (tied weights: a file stores them once, under any one name)."""
    by_storage: dict[tuple[int, int, tuple[int, ...]], set[str]] = {}
    groups: dict[str, set[str]] = {}
    for key, value in state.items():
        local = _local(value) if torch.is_tensor(value) else None
        if local is None or local.device.type == "meta" or local.numel() == 0:
            groups[key] = {key}
            continue
        identity = (local.untyped_storage().data_ptr(), int(local.storage_offset()), tuple(local.shape))
        groups[key] = by_storage.setdefault(identity, set())
        groups[key].add(key)
    return groups


def check_model_file(source: Path, name: str, module: nn.Module, strict: bool) -> None:
    """A saved model file holds the prepared model's keys (with ``strict``) at the model's shapes (always)."""
    header = safetensors_header(source, name)
    state = module.state_dict()
    mismatched = [f"{key} is {list(header[key].shape)} in the file but {list(value.shape)} in the model"
                  for key, value in state.items() if key in header and tuple(value.shape) != header[key].shape]
    if mismatched:
        shown = "; ".join(mismatched[:5]) + (f"; and {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
        raise CheckpointKeysError(f"The checkpoint {source / name} does not match the model: {shown}. Load it into the "
                                  "model it was saved from (strict=False does not load tensors of another shape).")
    groups = _tied_groups(state)
    missing = sorted(key for key in state if key not in header and not groups[key] & header.keys())
    unexpected = sorted(key for key in header if key not in state)
    if strict and (missing or unexpected):
        error = CheckpointKeysError(f"The checkpoint {source / name} does not match the model: missing keys {_keys(missing)}, "
                                    f"unexpected keys {_keys(unexpected)}. Load it into the model it was saved from, or "
                                    "pass strict=False to load what matches.")
        error.missing, error.unexpected = missing, unexpected
        raise error


def check_gradients_file(source: Path, name: str, module: nn.Module) -> None:
    """Saved gradients (inside an accumulation group) have their parameters' shapes."""
    header = safetensors_header(source, name)
    wrong = [f"{key} is {list(header[key].shape)} but the parameter is {list(_local(p).shape)}"
             for key, p in module.named_parameters() if key in header and header[key].shape != tuple(_local(p).shape)]
    if wrong:
        raise CheckpointKeysError(f"The checkpoint {source / name} does not match the model: {'; '.join(wrong[:5])}. "
                                  "Load it into the model and number of processes it was saved with.")


def check_optimizer_file(source: Path, name: str, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's JSON and tensors: its parameter groups match the prepared optimizer's."""
    skeleton = read_state_json(source, f"{name}.json", ("state", "param_groups"))
    groups = skeleton["param_groups"]
    saved = [len(group["params"]) if isinstance(group, dict) and isinstance(group.get("params"), list) else None
             for group in groups] if isinstance(groups, list) else None
    if saved is None or None in saved:
        raise damaged(source, f"{name}.json", "its 'param_groups' must be a list of groups that each list their 'params'")
    live = [len(group["params"]) for group in optimizer.param_groups]
    if saved != live:
        raise CheckpointError(f"The checkpoint {source} holds an optimizer ({name}.json) with parameter groups of "
                              f"{saved} parameters, but the prepared optimizer's groups have {live}. Prepare the same "
                              f"model and optimizer as the run that saved it. {_EARLIER} if this one is not yours.")
    check_tensor_refs(source, name, skeleton)
    return skeleton


def check_rng_file(source: Path, name: str) -> dict[str, Any] | None:
    """A process's RNG states (None when this process has none in the checkpoint)."""
    if not (source / f"{name}.json").is_file():
        return None
    skeleton = read_state_json(source, f"{name}.json", ("meta", "tensors"))
    meta = skeleton["meta"]
    if not (isinstance(meta, dict) and isinstance(meta.get("python"), dict) and isinstance(meta.get("numpy"), dict)):
        raise damaged(source, f"{name}.json", "its 'meta' must hold the 'python' and 'numpy' random states")
    check_tensor_refs(source, name, skeleton)
    if not (isinstance(skeleton["tensors"], dict) and "torch_cpu" in skeleton["tensors"]):
        raise damaged(source, f"{name}.json", "it has no torch CPU random state ('torch_cpu')")
    return skeleton


# -- which strategy wrote it ----------------------------------------------------------------------------------------
def own_format_writer(source: Path) -> str | None:
    """The strategy whose own format (a folder of its own) holds the models, or None for the common layout."""
    for folder, strategy in OWN_FORMAT_FOLDERS.items():
        if (source / folder).is_dir():
            return strategy
    return None


def check_strategy(source: Path, info: dict[str, Any], current: str, models: int) -> bool:
    """Whether the current strategy reads this checkpoint's models from its own format (True) or model files.

    A checkpoint in another strategy's own format has no ``model.safetensors``: that is one error
    naming the strategy that wrote it and how to load it.
    """
    writer = own_format_writer(source)
    saved = str(info.get("strategy", writer or "unknown"))
    if writer is None or models == 0:
        return False
    if writer == current:
        return True
    if (source / "model.safetensors").is_file():
        return False
    folder = next(name for name, strategy in OWN_FORMAT_FOLDERS.items() if strategy == writer and (source / name).is_dir())
    if writer == "fsdp":
        fix = (f"load it with the FSDP strategy (on any number of processes), or join its shards into whole weights with "
               f"`trainer merge-weights {source} OUTPUT_DIR` and load those weights into the model "
               "(safetensors.torch.load_model, or load_checkpoint_and_dispatch)")
    else:
        fix = f"load it with the {writer} strategy and the same layout"
    raise CheckpointFileNotFoundError(
        f"The checkpoint {source} was written by the {saved} strategy, which keeps the models in its own format "
        f"({folder}/), so it has no model.safetensors for the {current} strategy to read: {fix}.")


@contextmanager
def restoring(source: Path, name: str, target: str) -> Iterator[None]:
    """Name the file when an object's own ``load_state_dict`` rejects what the checkpoint holds."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise CheckpointError(
            f"The checkpoint {source} could not be restored into the {target}: {name} holds what it does not accept "
            f"({type(error).__name__}: {error}). The objects restored before it hold the checkpoint's values; "
            f"{_EARLIER.lower()}, or prepare the same objects as the run that saved it.") from error
