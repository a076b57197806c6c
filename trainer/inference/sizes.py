"""Memory sizes: parsing ``"2GiB"``/``"500MB"``, and the bytes each module's weights take."""

from __future__ import annotations

import difflib
import re
from collections import defaultdict

import torch
from torch import nn

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_UNIT_SPELLING = {"KIB": "KiB", "MIB": "MiB", "GIB": "GiB", "TIB": "TiB"}


def parse_size(size: int | float | str) -> int:
    """Bytes from an int or a string such as ``"2GiB"``, ``"500MB"``, ``"1.5 GB"`` (GB = 10**9, GiB = 2**30)."""
    if isinstance(size, bool):
        raise ValueError(f"Not a memory size: {size!r}.")
    if isinstance(size, (int, float)):
        if size < 0:
            raise ValueError(f"A memory size cannot be negative: {size!r}.")
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        hint = ""
        if match is not None and unit:
            close = difflib.get_close_matches(unit, [u for u in _UNITS if u], n=1, cutoff=0.3)
            hint = f" Did you mean '{match.group(1)}{_UNIT_SPELLING.get(close[0], close[0])}'?" if close else ""
        raise ValueError(f"Not a memory size: {size!r}.{hint} Use bytes or a number with a unit: "
                         "'500MB', '2GB' (powers of 10) or '2GiB' (powers of 2).")
    return int(float(match.group(1)) * _UNITS[unit])


# Spellings ``as_dtype`` takes besides torch's own attribute names (``"float16"``, ``"half"``, ``"torch.bfloat16"``).
DTYPE_ALIASES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# The names an error lists: the ones people load weights in.
COMMON_DTYPES = ("float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16")


def _torch_dtype_names() -> list[str]:
    return [name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)]


def as_dtype(dtype: torch.dtype | str | None, label: str = "dtype") -> torch.dtype | None:
    """A torch dtype from itself or its name (``"bfloat16"``, ``"torch.float16"``, ``"bf16"``); None stays None.

    A name that is no dtype is one error that lists the usual ones and suggests the closest;
    ``label`` is how the error calls the argument.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"{label}={dtype!r} is not a torch dtype: pass one (torch.bfloat16) or its name ('bfloat16').")
    name = dtype.strip().removeprefix("torch.")
    found = DTYPE_ALIASES.get(name.lower(), getattr(torch, name, None) or getattr(torch, name.lower(), None))
    if isinstance(found, torch.dtype):
        return found
    names = [*COMMON_DTYPES, *(n for n in _torch_dtype_names() if n not in COMMON_DTYPES)]
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{label}={dtype!r} is not a torch dtype.{hint} Use a torch.dtype or one of its names: "
                     f"{', '.join(repr(n) for n in COMMON_DTYPES)}, ...")


def dtype_size(dtype: torch.dtype) -> float:
    """Bytes per element (fractions for sub-byte types)."""
    if dtype == torch.bool:
        return 1
    return torch.finfo(dtype).bits / 8 if dtype.is_floating_point else torch.iinfo(dtype).bits / 8


def tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``tensor`` once converted to ``dtype`` (floating tensors only are converted)."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return int(tensor.numel() * dtype_size(target))


def named_tensors(module: nn.Module, include_buffers: bool = True) -> list[tuple[str, torch.Tensor]]:
    """Parameters (tied ones once) and, if asked, persistent and non-persistent buffers."""
    tensors: list[tuple[str, torch.Tensor]] = list(module.named_parameters(remove_duplicate=True))
    if include_buffers:
        tensors += list(module.named_buffers(remove_duplicate=True))
    return tensors


def module_sizes(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of weights under every module name (``""`` is the whole model), tied weights counted once."""
    sizes: dict[str, int] = defaultdict(int)
    for name, tensor in named_tensors(model):
        size = tensor_bytes(tensor, dtype)
        parts = name.split(".")
        for i in range(len(parts) + 1):
            sizes[".".join(parts[:i])] += size
    return dict(sizes)
