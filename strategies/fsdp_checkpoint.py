"""Sharded checkpoints: each process writes and reads only its own shards, in safetensors.

Layout, inside the checkpoint directory that ``save_state`` writes::

    sharded_state/
        sharded_state.json                          structure: which tensor is whose, optimizer hyperparameters
        shard-00001-model-00001-of-00001.safetensors  process 0's shards of every model and optimizer tensor
        shard-00002-model-00001-of-00001.safetensors  process 1's ...

The tensors go through ``torch.distributed.checkpoint`` (DCP) with its Hugging Face storage
(``HuggingFaceStorageWriter``/``Reader``): each safetensors file records where its pieces sit in the
full tensors, so a checkpoint written by N processes loads on M processes (the reader cuts and
joins the pieces), on one process without a process group, and into ``trainer merge-weights``.
That storage holds tensors only and writes no ``.metadata`` pickle, which is why everything that is
not a tensor (learning rates, betas, the parameter names of each group) goes to the JSON file
here: a checkpoint stays "safetensors + JSON", and nothing in it is unpickled.

Tensors are stored under flat keys: ``model.<fqn>`` for the first model (``model_1.<fqn>`` for
the second...), ``optimizer.state.<fqn>.<name>`` for optimizer state.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state_format import is_tensor_ref, join_state, split_state, tensor_keys, tensor_ref

DIRECTORY = "sharded_state"
INFO_FILE = "sharded_state.json"
FORMAT = "dcp-safetensors"
FORMAT_VERSION = 1
SAFE_SUFFIXES = (".json", ".safetensors")


class ShardedCheckpointError(ValueError):
    """A sharded checkpoint that cannot be read as it is; the message names the folder and the fix."""


def _name(kind: str, index: int) -> str:
    return kind if index == 0 else f"{kind}_{index}"


def tied_names(module: nn.Module) -> dict[str, str]:
    """Each name of a parameter or buffer registered under several names -> its first name (tied weights)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _split_model_state(module: nn.Module, state: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``split_tensors`` for a model state dict, tied weights stored once (safetensors refuses shared memory).

    The skeleton still names every key, the tied ones pointing at their first name's tensor.
    """
    shared = {alias: first for alias, first in tied_names(module).items() if alias in state and first in state}
    skeleton, tensors = split_state({k: v for k, v in state.items() if k not in shared}, prefix, materialize=False)
    refs = {alias: tensor_ref(f"{prefix}.{first}") for alias, first in shared.items()}
    return {k: refs[k] if k in refs else skeleton[k] for k in state}, tensors


# -- which module an optimizer belongs to ----------------------------------------------------------
def owner_of(optimizer: torch.optim.Optimizer, modules: list[nn.Module]) -> nn.Module:
    """The prepared model whose parameters the optimizer steps (the state dict helpers need it)."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules:
        if params <= {id(p) for p in module.parameters()}:
            return module
    raise ValueError("An optimizer steps parameters of several prepared models (or of none); a sharded checkpoint "
                     "needs one optimizer per model. Use one optimizer per model, or state_dict_type='FULL_STATE_DICT'.")


@contextmanager
def _quiet_without_process_group() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists: here that is the intent."""
    with warnings.catch_warnings():
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        yield


# -- save and load ----------------------------------------------------------------------------------
def save_sharded_state(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer], directory: Path,
                       process_index: int, num_processes: int, background: bool = False,
                       process_group: Any = None) -> Future[Any] | None:
    """Write every model's and optimizer's state (each process its own shards) under ``directory/sharded_state``.

    Called on every process; the JSON is written by process 0 only. With ``background``, DCP's
    ``async_save`` copies the shards to CPU memory here and writes them from a thread of its own,
    agreeing with the other processes over ``process_group``: the returned future completes once
    they are written.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    folder = Path(directory) / DIRECTORY
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "num_processes": num_processes,
                            "models": [], "optimizers": []}
    for index, module in enumerate(modules):
        skeleton, part = _split_model_state(module, get_model_state_dict(module), _name("model", index))
        tensors.update(part)
        info["models"].append({"prefix": _name("model", index), "state": skeleton})
    for index, optimizer in enumerate(optimizers):
        state = _optimizer_state_dict(owner_of(optimizer, modules), optimizer)
        skeleton, part = split_state(state, _name("optimizer", index), materialize=False)
        tensors.update(part)
        info["optimizers"].append({"prefix": _name("optimizer", index), "state": skeleton})
    gathers: list[Any] = [getattr(m, "gather_to_first_stage", None) for m in modules]
    gather = next((g for g in gathers if g is not None), None)
    if gather is not None:  # pipeline stages: one JSON of the whole model, from every stage's part
        parts = gather(info)
        info = _merge_stage_infos(parts) if parts is not None else info
    if process_index == 0:
        (folder / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    writer = HuggingFaceStorageWriter(str(folder), save_distributed=True)
    if background:
        alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        started = dcp.async_save(tensors, storage_writer=writer, process_group=process_group, no_dist=alone)
        return started if isinstance(started, Future) else started.upload_completion
    with _quiet_without_process_group():
        dcp.save(tensors, storage_writer=writer)
    return None


def _merge_stage_infos(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One description of the whole model from its pipeline stages' (each names only its own parameters)."""
    merged = {**parts[0], "models": [], "optimizers": []}
    for index, model in enumerate(parts[0]["models"]):
        state: dict[str, Any] = {}
        for part in parts:
            state.update(part["models"][index]["state"])
        merged["models"].append({**model, "state": state})
    for index, optimizer in enumerate(parts[0]["optimizers"]):
        saved = [part["optimizers"][index]["state"] for part in parts]
        per_parameter: dict[str, Any] = {}
        for stage in saved:
            per_parameter.update(stage["state"])
        groups = [{**group, "params": [name for stage in saved for name in stage["param_groups"][g]["params"]]}
                  for g, group in enumerate(saved[0]["param_groups"])]
        merged["optimizers"].append({**optimizer, "state": {**saved[0], "state": per_parameter, "param_groups": groups}})
    return merged


def _optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``get_optimizer_state_dict``, without leaving state in an optimizer that has not stepped yet.

    The helper initialises a fresh optimizer's state with one step at learning rate 0 (so that it
    has tensors to describe); kept, that would count a step the run never took.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    fresh = not optimizer.state
    state = get_optimizer_state_dict(module, optimizer)
    if fresh:
        optimizer.state.clear()
        state = {**state, "state": {}}
    return state


def find_sharded_state(path: Path) -> Path | None:
    """The ``sharded_state`` folder of a checkpoint directory (or the folder itself); None if there is none."""
    path = Path(path)
    for folder in (path / DIRECTORY, path):
        if (folder / INFO_FILE).is_file():
            return folder
    return None


def read_info(folder: Path) -> dict[str, Any]:
    """The JSON half of a sharded checkpoint, after checking the folder holds nothing that could run code."""
    foreign = sorted(p.name for p in folder.iterdir() if p.suffix not in SAFE_SUFFIXES)
    if foreign:
        raise ShardedCheckpointError(
            f"Refusing to read {folder}: it contains {foreign}, which are neither JSON nor safetensors (a pickle such "
            "as DCP's .metadata can run code when read). Sharded checkpoints written by this project hold only those "
            "two formats; remove the file(s) if the checkpoint is otherwise yours.")
    info = json.loads((folder / INFO_FILE).read_text())
    if info.get("format") != FORMAT or int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise ShardedCheckpointError(f"{folder / INFO_FILE} describes a {info.get('format')!r} checkpoint, version "
                                     f"{info.get('format_version')}; this release reads {FORMAT!r} up to version "
                                     f"{FORMAT_VERSION}.")
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise ShardedCheckpointError(f"{folder} has no safetensors shards: the checkpoint is incomplete.")
    return info


def load_sharded_state(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer], folder: Path,
                       strict: bool = True) -> None:
    """Read what ``save_sharded_state`` wrote into the prepared models and optimizers.

    Works on any number of processes, including one without a process group: DCP cuts each
    process's part out of the shards, whatever number of processes wrote them.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    info = read_info(folder)
    saved_models, saved_optimizers = info["models"], info["optimizers"]
    if strict and (len(saved_models), len(saved_optimizers)) != (len(modules), len(optimizers)):
        raise ShardedCheckpointError(
            f"{folder} holds {len(saved_models)} model(s) and {len(saved_optimizers)} optimizer(s), but "
            f"{len(modules)} and {len(optimizers)} were prepared.")
    # The live state dicts (sharded like the prepared model, or whole on one process) are the targets
    # DCP reads into; what the checkpoint says is not a tensor comes from its JSON.
    targets: dict[str, torch.Tensor] = {}
    for module, saved in zip(modules, saved_models, strict=False):
        _, part = _split_model_state(module, get_model_state_dict(module), saved["prefix"])
        wanted = set(tensor_keys(saved["state"]))
        whole: list[str] | None = getattr(module, "state_keys", None)  # a pipeline stage: part of these
        _check_keys(folder, saved["prefix"], set(part) if whole is None else {f"{saved['prefix']}.{k}" for k in whole},
                    wanted, strict)
        targets.update({k: v for k, v in part.items() if k in wanted})
    for index, (optimizer, saved) in enumerate(zip(optimizers, saved_optimizers, strict=False)):
        owner = owner_of(optimizer, modules)
        live = get_optimizer_state_dict(owner, optimizer)  # a fresh one is initialised
        if hasattr(owner, "state_keys"):  # a pipeline stage reads the state of its own parameters only
            saved_optimizers[index] = saved = {**saved, "state": _only_parameters(saved["state"], live)}
        _, part = split_state(live, saved["prefix"], materialize=False)
        wanted = set(tensor_keys(saved["state"]))
        missing = sorted(wanted - set(part))
        if missing:
            raise ShardedCheckpointError(f"{folder}: the optimizer state holds {missing[:5]} that the prepared "
                                         "optimizer has no place for; prepare the same model and optimizer.")
        targets.update({k: part[k] for k in wanted})
    with _quiet_without_process_group():
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder)), planner=DefaultLoadPlanner())
    for module, saved in zip(modules, saved_models, strict=False):
        # A model state dict is flat: keep the entries whose tensor was read (all of them, when strict).
        state = {name: join_state(value, targets) for name, value in saved["state"].items()
                 if not (is_tensor_ref(value) and tensor_keys(value)[0] not in targets)}
        set_model_state_dict(module, state, options=StateDictOptions(strict=strict))
    for optimizer, saved in zip(optimizers, saved_optimizers, strict=False):
        state = join_state(saved["state"], targets)
        set_optimizer_state_dict(owner_of(optimizer, modules), optimizer, state)
        if not state["state"]:  # saved before its first step: it must stay without state (no step counted)
            optimizer.state.clear()


def _only_parameters(saved: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """The part of a saved optimizer state (keyed by parameter name) for the parameters ``live`` steps."""
    mine = {name for group in live["param_groups"] for name in group["params"]}
    return {**saved, "state": {name: value for name, value in saved["state"].items() if name in mine},
            "param_groups": [{**group, "params": [name for name in group["params"] if name in mine]}
                             for group in saved["param_groups"]]}


def _check_keys(folder: Path, prefix: str, live: set[str], saved: set[str], strict: bool) -> None:
    if not strict or live == saved:
        return
    cut = len(prefix) + 1
    missing, unexpected = sorted(k[cut:] for k in live - saved), sorted(k[cut:] for k in saved - live)
    raise ShardedCheckpointError(f"The checkpoint {folder} does not match the model: missing keys {missing[:10]}, "
                                 f"unexpected keys {unexpected[:10]}. Load it into the model it was saved from, or "
                                 "pass strict=False to load what matches.")


# -- whole tensors, for merge-weights -------------------------------------------------------------------
def model_tensor_specs(folder: Path, model_index: int = 0) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (full shape, dtype) of every weight of one saved model; tied weights once, by their first name."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    info = read_info(folder)
    if model_index >= len(info["models"]):
        raise ShardedCheckpointError(f"{folder} holds {len(info['models'])} model(s); there is no model {model_index}.")
    prefix = info["models"][model_index]["prefix"] + "."
    metadata = HuggingFaceStorageReader(str(folder)).read_metadata()
    specs = {}
    for key in dict.fromkeys(tensor_keys(info["models"][model_index]["state"])):  # tied weights: once
        entry = metadata.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise ShardedCheckpointError(f"{folder}: the shards hold no tensor {key!r}; the checkpoint is incomplete.")
        specs[key[len(prefix):]] = (entry.size, entry.properties.dtype)
    return specs


def load_full_tensors(folder: Path, names: list[str], model_index: int = 0) -> dict[str, torch.Tensor]:
    """Whole tensors of one saved model (joined from every process's shards), on the CPU, one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    prefix = read_info(folder)["models"][model_index]["prefix"] + "."
    specs = model_tensor_specs(folder, model_index)
    targets = {prefix + name: torch.empty(specs[name][0], dtype=specs[name][1]) for name in names}
    with _quiet_without_process_group():
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder)),
                 planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    return {name: targets[prefix + name] for name in names}
