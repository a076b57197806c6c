"""Put a model's weights where a device map says, and hook the offloaded parts so the model runs as usual.

``load_checkpoint_and_dispatch`` fills a model built with ``init_empty_weights`` from a
checkpoint, one shard at a time: weights for an accelerator or the CPU are read and placed,
weights for the disk stay in the checkpoint's own safetensors files (or are written once to the
offload folder when they must be converted), so peak memory stays near what the map keeps in
memory plus one shard. ``dispatch_model`` does the same for a model whose weights are already
in memory, and ``cpu_offload`` / ``disk_offload`` offload every layer.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.inference.device_map import (
    Device,
    check_device_map,
    device_for,
    find_tied_parameters,
    no_split_classes,
    resolve_device_map,
    torch_device,
)
from trainer.inference.hooks import OffloadedModule, OffloadHooks, get_tensor, set_tensor
from trainer.inference.offload import OffloadedWeights
from trainer.inference.sizes import as_dtype
from trainer.inference.tensor_map import TensorMap
from trainer.inference.tensor_reader import TensorReader

if TYPE_CHECKING:
    from trainer.inference.checkpoint_files import CheckpointFiles


@dataclass
class Dispatch:
    """What ``dispatch_model`` attached to a model: its hooks and the store of its offloaded weights."""

    hooks: OffloadHooks
    weights: OffloadedWeights


_DISPATCH = "_dispatch"  # the model attribute that holds its Dispatch


def dispatch_of(model: nn.Module) -> Dispatch | None:
    """The hooks and weights store ``dispatch_model`` attached to ``model``, or None."""
    return vars(model).get(_DISPATCH)


def _attach(model: nn.Module, device_map: Mapping[str, Device] | None, hooks: OffloadHooks,
            weights: OffloadedWeights) -> None:
    if device_map is not None:
        vars(model)["hf_device_map"] = dict(device_map)  # where transformers users look for it
    vars(model)[_DISPATCH] = Dispatch(hooks, weights)


def main_device(device_map: Mapping[str, Device]) -> torch.device:
    """Where offloaded layers run: the first accelerator the map uses, else the CPU."""
    accelerators = [d for d in device_map.values() if d not in ("cpu", "disk")]
    return torch_device(accelerators[0]) if accelerators else torch.device("cpu")


def offloaded(device: Device, main: torch.device) -> bool:
    """Weights kept away from where they run: on disk, or on the CPU when layers run on an accelerator."""
    return device == "disk" or (device == "cpu" and main.type != "cpu")


def aliases_of(model: nn.Module) -> dict[str, str]:
    """Each tied parameter's name -> the group's first name (the one weights are stored under)."""
    return {name: group[0] for group in find_tied_parameters(model) for name in group}


def saved_once(aliases: Mapping[str, str], present: Iterable[str]) -> list[str]:
    """The tied names a checkpoint lacks because it holds their weight under another name of the group."""
    present = set(present)
    return [name for name, canonical in aliases.items() if name not in present
            and any(other in present for other, c in aliases.items() if c == canonical)]


def place(model: nn.Module, name: str, tensor: torch.Tensor, aliases: Mapping[str, str]) -> None:
    """Put ``tensor`` in the model under ``name`` and every name tied to it (one Parameter object for all)."""
    current = get_tensor(model, name)
    value = nn.Parameter(tensor, requires_grad=current.requires_grad) if isinstance(current, nn.Parameter) else tensor
    canonical = aliases.get(name)
    names = [n for n, c in aliases.items() if c == canonical] if canonical else [name]
    for target in names:
        set_tensor(model, target, value)


def loaded_dtype(stored: torch.dtype, model: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a checkpoint tensor is loaded as: the model's own, or ``dtype`` for floating weights when given.

    A checkpoint saved in another dtype never changes the model's dtypes on its own (as torch's
    ``load_state_dict`` copies into the existing tensors); ``dtype=`` is the one way to ask for that.
    """
    if dtype is not None and stored.is_floating_point and model.is_floating_point:
        return dtype
    return model


def dispatch_model(model: nn.Module, device_map: Mapping[str, Device], weights: OffloadedWeights | None = None,
                   offload_folder: str | os.PathLike | None = None, prefetch: int = 1,
                   no_split_module_classes: Iterable[str] | None = None) -> nn.Module:
    """Hook ``model`` so it runs with its weights spread as ``device_map`` says.

    Resident weights that are real are moved to their device; offloaded weights that are real
    are moved into CPU memory or written once to ``offload_folder``, and replaced by meta
    placeholders; weights still on the meta device must be in ``weights``. ``prefetch`` is the
    number of offloaded layers read ahead of the one running (0 turns prefetching off). Offloaded
    weights are brought in per no-split block (default: a transformers model's ``_no_split_modules``)
    or per module holding them.
    """
    device_map = check_device_map(model, device_map)
    no_split = no_split_classes(model, no_split_module_classes)
    main = main_device(device_map)
    weights = weights if weights is not None else OffloadedWeights(offload_folder, pin=main.type == "cuda")
    aliases = aliases_of(model)
    groups: dict[str, dict[str, str]] = defaultdict(dict)  # offloaded owner module -> {local tensor: stored name}
    to_write: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    parameters = list(model.named_parameters(remove_duplicate=False))
    buffers = list(model.named_buffers())
    for index, (name, tensor) in enumerate([*parameters, *buffers]):
        device = device_for(name, device_map)
        stored = aliases.get(name, name)
        is_buffer = index >= len(parameters)
        if offloaded(device, main) and not is_buffer:
            owner = _offload_owner(model, name, device_map, no_split)
            groups[owner][name[len(owner) + 1:] if owner else name] = stored
            if tensor.device.type != "meta" and stored not in weights and stored not in to_write[owner]:
                if device == "disk":
                    to_write[owner][stored] = tensor.detach()
                else:
                    weights.keep_in_memory(stored, tensor)
            if tensor.device.type != "meta":
                set_tensor(model, name, _meta_like(tensor))
            continue
        target = main if offloaded(device, main) else torch_device(device)
        if tensor.device.type == "meta":
            if stored not in weights:
                raise ValueError(f"{name} is on the meta device and no weights were given for it: load a checkpoint "
                                 "(load_checkpoint_and_dispatch) or build the model with real weights.")
            place(model, name, weights.load(stored).to(target), aliases)
        elif tensor.device != target:
            place(model, name, tensor.detach().to(target), aliases)
    for written in to_write.values():
        weights.write(written)
    hooks = OffloadHooks()
    layers = [OffloadedModule(model.get_submodule(owner), locals_, weights, main) for owner, locals_ in groups.items()]
    hooks.offload(layers, prefetch)
    modules = dict(model.named_modules())
    for name, device in device_map.items():
        if not offloaded(device, main) and torch_device(device) != main and name in modules:
            hooks.move_inputs(modules[name], torch_device(device))
    if len({str(torch_device(d)) for d in device_map.values() if d != "disk"}) > 1 or main.type != "cpu":
        hooks.return_outputs_to_input_device(model)
    _attach(model, device_map, hooks, weights)
    return model


def _offload_owner(model: nn.Module, name: str, device_map: Mapping[str, Device], no_split: set[str]) -> str:
    """The module whose forward brings ``name``: the smallest unit inside its map entry that holds it.

    Offloading a whole entry at once would bring all of it into memory together (a map of
    ``{"": "disk"}`` would load the whole model), so the hooks sit on the units inside: a
    no-split block whole, otherwise the module that holds the tensor directly.
    """
    probe = name
    while probe not in device_map:
        probe = probe.rpartition(".")[0]
    owner = name.rpartition(".")[0] if probe == name else probe
    rest = name[len(owner) + 1:] if owner else name
    while "." in rest and type(model.get_submodule(owner)).__name__ not in no_split:
        child, _, rest = rest.partition(".")
        owner = f"{owner}.{child}" if owner else child
    return owner


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta


def remove_dispatch(model: nn.Module) -> None:
    """Take the hooks off (offloaded weights go back to their placeholders)."""
    dispatch = vars(model).pop(_DISPATCH, None)
    if dispatch is not None:
        dispatch.hooks.remove()
        dispatch.weights.close()


def load_checkpoint_and_dispatch(model: nn.Module, checkpoint: str | os.PathLike, device_map: Any = "auto",
                                 max_memory: Mapping[Device, int | str] | None = None,
                                 no_split_module_classes: Iterable[str] | None = None,
                                 offload_folder: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
                                 strict: bool = True, prefetch: int = 1, quantization: Any = None,
                                 mmap: bool = True) -> nn.Module:
    """Fill ``model`` (usually built with ``init_empty_weights``) from ``checkpoint`` and dispatch it.

    ``checkpoint``: a safetensors file, a folder of shards with an index JSON, or a ``.bin``
    state dict (loaded with ``weights_only=True``). Keys are checked against the model before
    anything is read: missing, unexpected (with ``strict``) or differently shaped weights are
    one error that lists them. ``quantization`` (a ``QuantizationConfig``, its keyword arguments as a dict, or a
    ``BitsAndBytesConfig``) swaps linear layers for bitsandbytes ones, quantized as each weight is read.
    ``mmap`` (default True): weights that stay on the CPU in the dtype they are stored in view the
    safetensors file's pages, copy-on-write, instead of being read into memory of their own (no
    copy, no memory until a page is touched; writing into such a weight never changes the file).
    """
    from trainer.inference.checkpoint_files import CheckpointFiles, check_against_model

    dtype = as_dtype(dtype)
    if quantization is not None:
        from trainer.inference.quantization import quantize_model

        model = quantize_model(model, quantization)
    files = CheckpointFiles(checkpoint)
    aliases = aliases_of(model)
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict(keep_vars=True).items()}
    present = set(files.names())
    tied_absent = saved_once(aliases, present)
    # Keys the model does not load: its non-persistent buffers (position ids that older versions saved),
    # and what a transformers model lists as ignorable.
    unloaded = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    computed = {name for name, _ in model.named_buffers()} - set(expected)
    ignored = [name for name in present if name not in expected
               and (name in computed or any(p.search(name) for p in unloaded))]
    check_against_model(files, expected, strict=strict, ignore=tied_absent + ignored)
    device_map = resolve_device_map(model, device_map, max_memory, no_split_classes(model, no_split_module_classes), dtype)
    main = main_device(device_map)
    if quantization is not None:
        from trainer.inference.quantization import check_quantized_placement

        check_quantized_placement(model, device_map, main)
    wanted = set(expected)
    stored_names = {name: aliases.get(name, name) for name in present if name in wanted}  # tied: the group's first name
    # A weight a bitsandbytes layer quantizes is read as stored (or as dtype=): the layer's own dtype is the packed one.
    targets = {name: loaded_dtype(files.dtype(name), files.dtype(name) if _quantized(model, name) else expected[name][1],
                                  dtype) for name in stored_names}
    buffers = {name for name, _ in model.named_buffers()}
    _check_offload_folder(files, [name for name in stored_names if name not in buffers], device_map, offload_folder)
    weights = OffloadedWeights(offload_folder, pin=main.type == "cuda")
    reader, mapper = TensorReader(), TensorMap() if mmap else None
    try:
        for shard in files.shards:
            _load_shard(model, files, shard, device_map, main, weights, reader, mapper, targets, stored_names, aliases)
    finally:
        reader.close()
        if mapper is not None:
            mapper.release()
    return dispatch_model(model, device_map, weights=weights, prefetch=prefetch, no_split_module_classes=no_split_module_classes)


def _check_offload_folder(files: CheckpointFiles, names: Iterable[str], device_map: Mapping[str, Device],
                          offload_folder: str | os.PathLike | None) -> None:
    """Disk weights of a torch file are written once to a folder (they cannot be read in place): one error before loading."""
    if offload_folder is not None:
        return
    written = sorted(name for name in names if device_for(name, device_map) == "disk"
                     and not files.is_safetensors(files.weight_map[name]))
    if written:
        raise ValueError(f"The device map puts {len(written)} weight(s) on disk ({written[0]}, ...) and checkpoint "
                         f"{files.path} is a torch file, which cannot be read in place: pass offload_folder= (a directory "
                         "they are written to once), convert the checkpoint to safetensors, or give the CPU more max_memory.")


def _write_converted(stored: torch.dtype, target: torch.dtype, weights: OffloadedWeights) -> bool:
    """Whether a disk weight is converted once into the offload folder rather than as each read needs it.

    Only a narrower dtype is worth writing (later reads are smaller), and only where a folder was given.
    """
    return target.itemsize < stored.itemsize and weights.offload_folder is not None


def _quantized(model: nn.Module, name: str) -> bool:
    """A weight that a bitsandbytes layer quantizes as it is read (its own dtype is the packed one)."""
    if not getattr(model, "is_quantized", False) or not name.endswith(".weight"):
        return False
    from trainer.inference.quantization import is_quantized_layer

    return is_quantized_layer(model.get_submodule(name.rpartition(".")[0]))


def _load_shard(model: nn.Module, files: CheckpointFiles, shard: Path, device_map: Mapping[str, Device],
                main: torch.device, weights: OffloadedWeights, reader: TensorReader, mapper: TensorMap | None,
                targets: Mapping[str, torch.dtype], stored_names: Mapping[str, str], aliases: Mapping[str, str]) -> None:
    """Place one shard's tensors as ``targets`` dtypes: resident ones read (or mapped) and put on their device,
    offloaded ones located or written (their meta placeholders take the same dtype)."""
    names = [name for name, path in files.weight_map.items() if path == shard and name in stored_names]
    to_write: OrderedDict[str, torch.Tensor] = OrderedDict()
    in_place = files.is_safetensors(shard)  # its tensors can be read one by one where they lie
    buffers = {name for name, _ in model.named_buffers()}
    for name in names:
        device = device_for(name, device_map)
        if name in buffers and offloaded(device, main):
            device = _device_key(main)  # buffers are not offloaded: they stay where their layer runs
        stored, target = stored_names[name], targets[name]
        if stored in weights:
            continue  # a tied weight the checkpoint holds twice
        if offloaded(device, main) and get_tensor(model, name).dtype != target:
            place(model, name, torch.empty(files.shape(name), dtype=target, device="meta"), aliases)
        if device == "disk" and in_place and not _write_converted(files.dtype(name), target, weights):
            weights.locate(stored, files.location(name), target)  # read from the checkpoint itself when needed: no copy
            continue
        if mapper is not None and in_place and _mappable(model, name, device, main, files.dtype(name), target):
            location = files.location(name)
            if mapper.can_map(location):
                place(model, name, mapper.tensor(location), aliases)
                continue
        tensor = reader.read(files.location(name)) if in_place else _from_bin(files, shard, name)
        tensor = tensor.to(target)
        if device == "disk":
            to_write[stored] = tensor
        elif offloaded(device, main):
            weights.keep_in_memory(stored, tensor)
        elif not _load_quantized(model, name, tensor, torch_device(device)):
            place(model, name, tensor.to(torch_device(device)), aliases)
    weights.write(to_write)


def _mappable(model: nn.Module, name: str, device: Device, main: torch.device, stored: torch.dtype,
              target: torch.dtype) -> bool:
    """A weight that stays on the CPU, as stored: it can view the file's pages."""
    return (not offloaded(device, main) and torch_device(device).type == "cpu" and stored == target
            and not _quantized(model, name))


def _load_quantized(model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device) -> bool:
    """Quantize a weight of a bitsandbytes layer as it is read (False for any other weight)."""
    if not getattr(model, "is_quantized", False):
        return False
    from trainer.inference.quantization import load_quantized_weight

    return load_quantized_weight(model, name, tensor, device)


def _from_bin(files: CheckpointFiles, shard: Path, name: str) -> torch.Tensor:
    for key, tensor in files.iter_shard(shard, [name]):
        if key == name:
            return tensor.clone()
    raise KeyError(name)


def _units(model: nn.Module, no_split: set[str]) -> OrderedDict[str, Device]:
    """The map that offloads every layer on its own: no-split blocks whole, otherwise each leaf module."""
    units: OrderedDict[str, Device] = OrderedDict()

    def visit(name: str, module: nn.Module) -> None:
        prefix = f"{name}." if name else ""
        direct = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        if type(module).__name__ in no_split or not list(module.children()):
            units[name] = "x"
            return
        for tensor_name in direct:
            units[prefix + tensor_name] = "x"
        for child_name, child in module.named_children():
            visit(prefix + child_name, child)

    visit("", model)
    return units


def cpu_offload(model: nn.Module, execution_device: torch.device | str | None = None, prefetch: int = 1,
                no_split_module_classes: Iterable[str] | None = None) -> nn.Module:
    """Keep every layer's weights in CPU memory and bring each to ``execution_device`` only while it runs."""
    device = torch.device(execution_device) if execution_device is not None else _default_execution_device()
    units = _units(model, no_split_classes(model, no_split_module_classes))
    device_map: OrderedDict[str, Device] = OrderedDict((name, "cpu") for name in units)
    if device.type != "cpu":
        device_map = OrderedDict([("", _device_key(device)), *((name, "cpu") for name in units if name)])
    weights = OffloadedWeights(pin=device.type == "cuda")
    if device.type == "cpu":  # everything already lives where it runs: hook the layers through the CPU store anyway
        return _offload_all(model, units, weights, device, prefetch)
    return dispatch_model(model, device_map, weights=weights, prefetch=prefetch)


def disk_offload(model: nn.Module, offload_dir: str | os.PathLike, execution_device: torch.device | str | None = None,
                 prefetch: int = 1, no_split_module_classes: Iterable[str] | None = None) -> nn.Module:
    """Write every layer's weights to ``offload_dir`` once and read each back only while it runs."""
    device = torch.device(execution_device) if execution_device is not None else _default_execution_device()
    units = _units(model, no_split_classes(model, no_split_module_classes))
    device_map: OrderedDict[str, Device] = OrderedDict((name, "disk") for name in units)
    if device.type != "cpu":
        device_map = OrderedDict([("", _device_key(device)), *device_map.items()])
    return dispatch_model(model, device_map, offload_folder=offload_dir, prefetch=prefetch)


def _offload_all(model: nn.Module, units: Mapping[str, Device], weights: OffloadedWeights, device: torch.device,
                 prefetch: int) -> nn.Module:
    """CPU offload with the CPU as the execution device: every layer's weights held by the store."""
    aliases = aliases_of(model)
    no_split = no_split_classes(model, None)
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for name, tensor in list(model.named_parameters(remove_duplicate=False)):
        owner = _offload_owner(model, name, units, no_split)
        stored = aliases.get(name, name)
        if stored not in weights:
            weights.keep_in_memory(stored, tensor)
        groups[owner][name[len(owner) + 1:] if owner else name] = stored
        set_tensor(model, name, _meta_like(tensor))
    hooks = OffloadHooks()
    hooks.offload([OffloadedModule(model.get_submodule(o), t, weights, device) for o, t in groups.items()], prefetch)
    _attach(model, None, hooks, weights)
    return model


def _device_key(device: torch.device) -> Device:
    return device.index or 0 if device.type == "cuda" else device.type


def _default_execution_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
