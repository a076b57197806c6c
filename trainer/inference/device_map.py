"""Device maps: which device holds each module's weights (accelerators, then CPU, then disk).

A device map is ``{module name: device}`` where a device is an accelerator index (``0``), a
device string (``"cuda:1"``, ``"mps"``), ``"cpu"`` or ``"disk"``; ``""`` names the whole model.
Every weight must be covered by exactly one entry (the longest matching name wins). Modules
whose class is in ``no_split_module_classes`` (a transformer block) are never divided between
devices, and parameters tied together (input and output embeddings) always share one.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import psutil
import torch
from torch import nn

from trainer.inference.sizes import as_dtype, module_sizes, parse_size, tensor_bytes

Device = int | str
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
MEMORY_HEADROOM = 0.9  # of the free memory a default budget takes (allocator caches, fragmentation)


class DeviceMapError(ValueError):
    """A device map or memory budget that cannot work; the message says what to change."""


def accelerator_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 0


def canonical_device(device: Device | torch.device) -> Device:
    """``0``, ``"cuda:0"`` and ``torch.device("cuda", 0)`` as ``0``; ``"cpu"`` and ``"disk"`` as they are."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, str):
        if device.startswith("cuda:") and device[5:].isdigit():
            return int(device[5:])
        if device == "cuda":
            return 0
        if device.isdigit():
            return int(device)
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise DeviceMapError(f"{device!r} is not a device: use an accelerator index (0), 'cpu' or 'disk'.")
    return device


def check_device(device: Device | torch.device) -> Device:
    """A device this machine has (or ``"disk"``), else one clear error."""
    device = canonical_device(device)
    count = accelerator_count()
    if isinstance(device, int):
        if device < 0 or device >= count:
            have = f"accelerators 0..{count - 1}" if count else "no accelerator"
            raise DeviceMapError(f"Device {device} is not on this machine ({have}); use 'cpu' or 'disk' for the rest.")
        return device
    if device in ("cpu", "disk"):
        return device
    if device == "mps" and torch.backends.mps.is_available():
        return device
    raise DeviceMapError(f"Unknown device {device!r}: use an accelerator index (0), 'cpu' or 'disk'.")


def torch_device(device: Device) -> torch.device:
    """Where a mapped device computes: ``"disk"`` has no compute of its own."""
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def get_max_memory(max_memory: Mapping[Device, int | str] | None = None) -> dict[Device, int]:
    """Bytes each device may hold: the given budget (strings parsed), or 90% of what is free now."""
    if max_memory is None:
        budget: dict[Device, int] = {}
        for index in range(accelerator_count()):
            free, _ = torch.cuda.mem_get_info(index)
            budget[index] = int(free * MEMORY_HEADROOM)
        budget["cpu"] = int(psutil.virtual_memory().available * MEMORY_HEADROOM)
        return budget
    if not isinstance(max_memory, Mapping):
        raise DeviceMapError(f"max_memory={max_memory!r}: give a dict {{device: size}}, such as {{0: '10GiB', 'cpu': '30GiB'}}.")
    budget = {}
    for device, size in max_memory.items():
        try:
            budget[check_device(device)] = parse_size(size)
        except ValueError as error:
            raise DeviceMapError(f"max_memory[{device!r}]: {error}") from None
    budget.setdefault("cpu", int(psutil.virtual_memory().available * MEMORY_HEADROOM))
    return budget


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (e.g. ``["lm_head.weight", "transformer.wte.weight"]``)."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id[id(param)].append(name)
    return [sorted(names) for names in by_id.values() if len(names) > 1]


def no_split_classes(model: nn.Module, no_split_module_classes: Iterable[str] | None) -> set[str]:
    """The given classes, else a transformers model's own ``_no_split_modules``."""
    if no_split_module_classes is None:
        no_split_module_classes = getattr(model, "_no_split_modules", None) or ()
    return set(no_split_module_classes)


def _leaves(model: nn.Module, names: list[str], no_split: set[str]) -> list[tuple[str, nn.Module | None]]:
    """Expand ``names`` one level: a module becomes its direct tensors and children (None marks a tensor)."""
    out: list[tuple[str, nn.Module | None]] = []
    for name in names:
        module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        for tensor_name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            out.append((prefix + tensor_name, None))
        for child_name, child in module.named_children():
            out.append((prefix + child_name, child))
    return out


def infer_auto_device_map(model: nn.Module, max_memory: Mapping[Device, int | str] | None = None,
                          no_split_module_classes: Iterable[str] | None = None, dtype: torch.dtype | str | None = None,
                          strategy: str = "auto", reserve_largest_layer: bool = True) -> OrderedDict[str, Device]:
    """Place the model's modules on devices in order: accelerators, then CPU, then disk.

    Modules are taken in definition order (for transformers models, execution order) and put on
    the current device while they fit its budget; a module that does not fit is divided into its
    children unless its class is a no-split class, in which case it moves whole to the next
    device. When anything ends up off the main device, room for the largest layer is kept free
    on the main device (``reserve_largest_layer``), since offloaded layers are brought there to
    run. ``strategy``: ``"sequential"`` fills each accelerator to its budget; ``"balanced"``
    spreads the model evenly over the accelerators; ``"balanced_low_0"`` keeps accelerator 0
    light (for ``generate``); ``"auto"`` is ``"balanced"`` with several accelerators.
    """
    if strategy not in STRATEGIES:
        close = difflib.get_close_matches(str(strategy), STRATEGIES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DeviceMapError(f"Unknown device map strategy {strategy!r}.{hint} Use one of {STRATEGIES}.")
    dtype = as_dtype(dtype)
    budget = get_max_memory(max_memory)
    accelerators = sorted(d for d in budget if isinstance(d, int))
    if strategy in ("auto", "balanced", "balanced_low_0") and len(accelerators) > 1:
        budget = balanced_budget(model, budget, dtype, low_zero=strategy == "balanced_low_0")
    devices: list[Device] = [*accelerators, *[d for d in budget if isinstance(d, str) and d not in ("cpu", "disk")],
                             "cpu", "disk"]
    no_split = no_split_classes(model, no_split_module_classes)
    sizes = module_sizes(model, dtype)
    tied = find_tied_parameters(model)
    largest = largest_layer(model, no_split, sizes)

    device_map = _fill(model, devices, budget, no_split, sizes, tied, reserve=0)
    if reserve_largest_layer and any(device != devices[0] for device in device_map.values()):
        device_map = _fill(model, devices, budget, no_split, sizes, tied, reserve=largest[1])
    main = devices[0]
    if main != "disk" and budget.get(main, 0) < largest[1]:
        raise DeviceMapError(
            f"max_memory gives {main!r} {budget.get(main, 0):,} bytes, but the largest layer ({largest[0] or 'the model'}, "
            f"{largest[1]:,} bytes) must fit there to run, even with the rest on disk. Raise max_memory[{main!r}] to at "
            f"least {largest[1]:,} bytes, or use a smaller dtype."
        )
    return compact_device_map(device_map)


def _fill(model: nn.Module, devices: list[Device], budget: Mapping[Device, int], no_split: set[str],
          sizes: Mapping[str, int], tied: list[list[str]], reserve: int) -> OrderedDict[str, Device]:
    placed: OrderedDict[str, Device] = OrderedDict()
    queue = _leaves(model, [""], no_split)
    index, used = 0, 0
    while queue:
        name, module = queue.pop(0)
        device = devices[index]
        size = sizes.get(name, 0) if module is not None else _tensor_size(model, name, sizes)
        limit = budget.get(device, 0) - (reserve if index == 0 else 0) if device != "disk" else float("inf")
        if used + size <= limit:
            placed[name] = device
            used += size
            continue
        splittable = module is not None and type(module).__name__ not in no_split and (
            next(module.children(), None) is not None or next(module.parameters(recurse=False), None) is not None)
        if splittable and size > 0:
            queue[:0] = _leaves(model, [name], no_split)
            continue
        index += 1
        used = 0
        queue.insert(0, (name, module))
    return _keep_tied_together(model, placed, tied, no_split)


def _keep_tied_together(model: nn.Module, placed: OrderedDict[str, Device], tied: list[list[str]],
                        no_split: set[str]) -> OrderedDict[str, Device]:
    """Tied weights are one tensor, counted where first placed: the other holders join that device.

    A holder that shares an entry with other modules is split off first, so only the module
    holding the tied weight moves (it adds no memory: the tensor is already there).
    """
    for group in tied:
        first = min(group, key=lambda name: list(placed).index(_entry_of(name, placed)))
        device = placed[_entry_of(first, placed)]
        for name in group:
            while placed[_entry_of(name, placed)] != device:
                entry = _entry_of(name, placed)
                holder = name.rpartition(".")[0]
                if entry in (holder, name):
                    placed[entry] = device
                    break
                position = list(placed).index(entry)
                items = list(placed.items())
                expanded = [(child, placed[entry]) for child, _ in _leaves(model, [entry], no_split)]
                placed = OrderedDict(items[:position] + expanded + items[position + 1:])
    return placed


def _entry_of(name: str, placed: Mapping[str, Device]) -> str:
    probe = name
    while probe not in placed:
        probe = probe.rpartition(".")[0]
    return probe


def _tensor_size(model: nn.Module, name: str, sizes: Mapping[str, int]) -> int:
    module_name, _, tensor_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    tensor = getattr(module, tensor_name)
    return tensor_bytes(tensor) if sizes.get(name) is None else sizes[name]


def largest_layer(model: nn.Module, no_split: set[str], sizes: Mapping[str, int]) -> tuple[str, int]:
    """The biggest unit that is run as a whole: a no-split block, or a leaf module."""
    best = ("", 0)
    for name, module in model.named_modules():
        is_unit = type(module).__name__ in no_split or not list(module.children())
        if is_unit and sizes.get(name, 0) > best[1]:
            best = (name, sizes[name])
    return best


def balanced_budget(model: nn.Module, budget: Mapping[Device, int], dtype: torch.dtype | None,
                    low_zero: bool = False) -> dict[Device, int]:
    """Budgets that spread the model evenly over the accelerators (accelerator 0 kept light with ``low_zero``)."""
    accelerators = sorted(d for d in budget if isinstance(d, int))
    total = module_sizes(model, dtype).get("", 0)
    share = total // (len(accelerators) - (1 if low_zero else 0)) if len(accelerators) > (1 if low_zero else 0) else total
    largest = max((s for n, s in module_sizes(model, dtype).items() if n and "." not in n), default=0)
    balanced = dict(budget)
    for device in accelerators:
        balanced[device] = min(budget[device], (largest if low_zero and device == 0 else share + largest))
    return balanced


def compact_device_map(device_map: Mapping[str, Device]) -> OrderedDict[str, Device]:
    """Merge entries: a parent whose children all went to one device becomes one entry."""
    entries = OrderedDict(device_map)
    changed = True
    while changed:
        changed = False
        parents: dict[str, set[Device]] = defaultdict(set)
        members: dict[str, list[str]] = defaultdict(list)
        for name, device in entries.items():
            if name:
                parent = name.rpartition(".")[0]
                parents[parent].add(device)
                members[parent].append(name)
        for parent, devices in parents.items():
            if len(devices) == 1 and parent not in entries and not any(
                    other.startswith(f"{parent}.") and other not in members[parent] for other in entries) and parent:
                device = next(iter(devices))
                first = list(entries).index(members[parent][0])
                items = [(k, v) for k, v in entries.items() if k not in members[parent]]
                items.insert(first, (parent, device))
                entries = OrderedDict(items)
                changed = True
                break
    if len(set(entries.values())) == 1:
        return OrderedDict([("", next(iter(entries.values())))])
    return entries


def device_for(name: str, device_map: Mapping[str, Device]) -> Device:
    """The device of tensor or module ``name``: the entry with the longest matching prefix."""
    probe = name
    while True:
        if probe in device_map:
            return device_map[probe]
        if not probe:
            raise DeviceMapError(f"No entry of the device map covers {name!r}.")
        probe = probe.rpartition(".")[0]


def check_device_map(model: nn.Module, device_map: Mapping[str, Device | torch.device]) -> OrderedDict[str, Device]:
    """Every entry names a real module or tensor and a real device; every weight is covered; tied weights share a device."""
    modules = dict(model.named_modules())
    tensors = {name for name, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    checked: OrderedDict[str, Device] = OrderedDict()
    for name, device in device_map.items():
        if name not in modules and name not in tensors:
            close = difflib.get_close_matches(name, list(modules) + sorted(tensors), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            top = [n for n in modules if n and "." not in n][:6]
            raise DeviceMapError(f"The device map names {name!r}, which is not a module or weight of "
                                 f"{type(model).__name__}.{hint} Use names from model.named_modules() (at the top: "
                                 f"{', '.join(map(repr, top))}).")
        try:
            checked[name] = check_device(device)
        except DeviceMapError as error:
            raise DeviceMapError(f"device_map[{name!r}]: {error}") from None
    uncovered = []
    for name in sorted(tensors):
        try:
            device_for(name, checked)
        except DeviceMapError:
            uncovered.append(name)
    if uncovered:
        shown = ", ".join(uncovered[:10]) + (f" and {len(uncovered) - 10} more" if len(uncovered) > 10 else "")
        raise DeviceMapError(f"The device map leaves {len(uncovered)} weight(s) without a device: {shown}. "
                             "Add entries for them, or '' for everything else.")
    for group in find_tied_parameters(model):
        devices = {device_for(name, checked) for name in group}
        if len(devices) > 1:
            raise DeviceMapError(f"Tied weights {group} are one tensor but the device map puts them on "
                                 f"{sorted(map(str, devices))}; put the modules holding them on one device.")
    return checked


def _looks_like_a_device(name: str) -> bool:
    return name in ("cpu", "disk", "mps", "cuda") or name.isdigit() or name.startswith(("cuda:", "mps:", "xpu", "npu"))


def resolve_device_map(model: nn.Module, device_map: Any, max_memory: Mapping[Device, int | str] | None = None,
                       no_split_module_classes: Iterable[str] | None = None,
                       dtype: torch.dtype | None = None) -> OrderedDict[str, Device]:
    """A checked device map from a strategy name, a device (everything there), or a dict."""
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return infer_auto_device_map(model, max_memory, no_split_module_classes, dtype, strategy=device_map)
    if isinstance(device_map, str) and not _looks_like_a_device(device_map):
        close = difflib.get_close_matches(device_map, STRATEGIES, n=1, cutoff=0.6)
        if close:
            raise DeviceMapError(f"device_map={device_map!r} is neither a strategy nor a device. Did you mean {close[0]!r}? "
                                 f"Use one of {', '.join(map(repr, STRATEGIES))}, a device, or a dict {{module name: device}}.")
    if isinstance(device_map, (int, str, torch.device)):
        return check_device_map(model, {"": device_map})
    if isinstance(device_map, Mapping):
        return check_device_map(model, device_map)
    raise DeviceMapError(f"device_map={device_map!r}: use 'auto', 'balanced', 'balanced_low_0', 'sequential', a device, "
                         "or a dict {module name: device}.")
