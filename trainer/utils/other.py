"""Small helpers scripts import from ``accelerate.utils``: saving on the main process, unwrapping, names, sizes."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.state import PartialState


def wait_for_everyone() -> None:
    """Block until every process of the job reaches this line."""
    PartialState().wait_for_everyone()


def save(obj: Any, f: str | os.PathLike, save_on_each_node: bool = False, safe_serialization: bool = False) -> None:
    """Save ``obj`` once: from the main process (of each node with ``save_on_each_node``).

    With ``safe_serialization`` ``obj`` is a dict of tensors written as safetensors.
    """
    state = PartialState()
    if not (state.is_local_main_process if save_on_each_node else state.is_main_process):
        return
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(clean_state_dict_for_safetensors(obj), str(f), metadata={"format": "pt"})
    else:
        torch.save(obj, f)


def load(f: str | os.PathLike, map_location: Any = None, **kwargs: Any) -> Any:
    """``torch.load``; only tensors and plain containers are unpickled unless ``weights_only=False`` is passed."""
    kwargs.setdefault("weights_only", True)
    return torch.load(f, map_location=map_location, **kwargs)


def id_tensor_storage(tensor: torch.Tensor) -> tuple[torch.device, int, int]:
    """What identifies a tensor's storage: tensors that share it are one tensor on disk."""
    storage = tensor.untyped_storage()
    return tensor.device, storage.data_ptr(), storage.nbytes()


def clean_state_dict_for_safetensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name of each group of tensors sharing storage (safetensors refuses shared tensors); make the rest contiguous."""
    groups: dict[Any, list[str]] = collections.defaultdict(list)
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor):
            groups[id_tensor_storage(tensor)].append(name)
    drop = {name for names in groups.values() for name in names[1:]}
    return {name: (value.contiguous() if isinstance(value, torch.Tensor) else value)
            for name, value in state_dict.items() if name not in drop}


def is_compiled_module(module: Any) -> bool:
    """True for a ``torch.compile``-d module."""
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


def has_compiled_regions(module: nn.Module) -> bool:
    """True when some submodule was compiled in place (``module.compile()``)."""
    return any(getattr(sub, "_compiled_call_impl", None) is not None for sub in module.modules())


def strip_parallel_wrappers(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / DeepSpeed engine wrappers (as many as there are)."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(module).__name__ == "DeepSpeedEngine" and hasattr(module, "module")):
        module = module.module  # type: ignore[assignment]  # the wrappers' module is an nn.Module
    return module


def unwrap_inside_compile(model: nn.Module, unwrap: Callable[[nn.Module], nn.Module],
                          keep_torch_compile: bool) -> nn.Module:
    """``unwrap`` applied to what a ``torch.compile`` wrapper holds; the wrapper stays around the result unless
    ``keep_torch_compile=False`` (a model that is not compiled is simply unwrapped)."""
    inner = unwrap(getattr(model, "_orig_mod", model))
    if keep_torch_compile and is_compiled_module(model):
        model._orig_mod = inner
        return model
    return inner


def extract_model_from_parallel(model: nn.Module, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True,
                                recursive: bool = False) -> nn.Module:
    """The user's module inside DDP/DataParallel/DeepSpeed wrappers (and ``torch.compile``, unless kept)."""
    from trainer.accelerator_state import current_accelerator

    accelerator = current_accelerator()
    if accelerator is not None:  # it also knows its strategy's wrapper and the autocast one
        return accelerator.unwrap_model(model, keep_fp32_wrapper=keep_fp32_wrapper, keep_torch_compile=keep_torch_compile)
    return unwrap_inside_compile(model, strip_parallel_wrappers, keep_torch_compile)


def merge_dicts(source: dict[str, Any], destination: dict[str, Any]) -> dict[str, Any]:
    """Merge ``source`` into ``destination`` recursively (nested dicts merged, other values replaced)."""
    for key, value in source.items():
        if isinstance(value, dict):
            merge_dicts(value, destination.setdefault(key, {}))
        else:
            destination[key] = value
    return destination


def recursive_getattr(obj: Any, attr: str) -> Any:
    """``getattr`` along a dotted path, e.g. ``recursive_getattr(model, "encoder.layer.0")``."""
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def get_pretty_name(obj: Any) -> str:
    """The qualified name of a class, function or object's class."""
    if not hasattr(obj, "__qualname__") and not hasattr(obj, "__name__"):
        obj = getattr(obj, "__class__", obj)
    return str(getattr(obj, "__qualname__", getattr(obj, "__name__", obj)))


def convert_bytes(size: float) -> str:
    """A byte count for people: ``"1.5 GB"`` (powers of 1024, as Accelerate prints)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1024.0:
            return f"{round(size, 2)} {unit}"
        size /= 1024.0
    return f"{round(size, 2)} PB"


def write_basic_config(mixed_precision: str = "no", save_location: str | os.PathLike | None = None,
                       use_xpu: bool = False) -> Path | bool:
    """Write the default launch configuration (what ``trainer config default`` writes); False if one exists."""
    from trainer import config as launch_config
    from trainer.cli.config_cmd import detected
    from trainer.precision.names import canonical_precision

    path = Path(save_location) if save_location is not None else launch_config.default_config_path()
    if path.exists():
        return False
    return launch_config.save(detected(False, canonical_precision(mixed_precision)), path)


def is_peft_model(model: Any) -> bool:
    """True for a ``peft`` model (``peft`` installed and the model one of its wrappers)."""
    from trainer.utils.availability import is_peft_available

    if not is_peft_available():
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def tqdm(*args: Any, main_process_only: bool = True, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm``, shown on the local main process only unless ``main_process_only=False``."""
    from tqdm.auto import tqdm as progress

    if main_process_only and not PartialState().is_local_main_process:
        kwargs["disable"] = True
    return progress(*args, **kwargs)


def get_grad_scaler(distributed_type: Any = None, **kwargs: Any) -> torch.amp.GradScaler:
    """An fp16 gradient scaler for this process's device (``kwargs`` as ``torch.amp.GradScaler``'s)."""
    return torch.amp.GradScaler(PartialState().device.type, **kwargs)


def get_mixed_precision_context_manager(native_amp: bool = False, autocast_kwargs: Any = None) -> Any:
    """``torch.autocast`` for the current mixed precision (a null context when none or ``native_amp`` is False)."""
    import contextlib

    from trainer.accelerator_state import AcceleratorState
    from trainer.precision.names import precision_dtype

    state = AcceleratorState()
    dtype = precision_dtype(state.mixed_precision)
    if not native_amp or dtype is None:
        return contextlib.nullcontext()
    extra = autocast_kwargs.to_kwargs() if autocast_kwargs is not None and hasattr(autocast_kwargs, "to_kwargs") else {}
    return torch.autocast(device_type=state.device.type, dtype=dtype, **(extra if isinstance(extra, Mapping) else {}))
