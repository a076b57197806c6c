"""What this machine offers to tests: its accelerator, how many of them, and which packages are installed."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch.torch_version import TorchVersion

from trainer.devices import accelerator_type


def is_installed(package: str) -> bool:
    """Whether ``package`` can be imported (found on the path; not imported)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def torch_at_least(minimum: str) -> bool:
    """Whether the installed torch is ``minimum`` or newer (local build tags such as ``+cpu`` ignored)."""
    return TorchVersion(str(torch.__version__).split("+")[0]) >= minimum


def _memory_allocated(kind: str) -> Callable[[], int]:
    if kind == "cpu":
        return lambda: 0
    return lambda: int(torch.accelerator.memory_allocated())


def _backend() -> tuple[str, int, Callable[[], int]]:
    kind = accelerator_type() or "cpu"
    count = 1 if kind in ("cpu", "mps") else torch.accelerator.device_count()
    return kind, count, _memory_allocated(kind)


torch_device, device_count, memory_allocated_func = _backend()
"""The device type tests run on (``"cuda"``, ``"xpu"``, ``"mps"``, ... or ``"cpu"``), how many such devices the
machine has (1 for the CPU and MPS), and a function giving the bytes allocated on the current one (0 on the CPU)."""


def cuda_available() -> bool:
    """Whether CUDA devices are usable (and this is not a TorchXLA machine, where CUDA is driven by XLA)."""
    return torch.cuda.is_available() and not is_installed("torch_xla")


def xpu_available() -> bool:
    """Whether Intel XPU devices are usable."""
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def tpu_available() -> bool:
    """Whether TorchXLA runs on a TPU here."""
    if not is_installed("torch_xla"):
        return False
    try:
        import torch_xla.runtime as xr

        return str(xr.device_type()).upper() == "TPU"
    except Exception:  # a broken or device-less TorchXLA install: no TPU
        return False


def gpu_count() -> int:
    """The number of CUDA devices."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def xpu_count() -> int:
    """The number of XPU devices."""
    return torch.xpu.device_count() if xpu_available() else 0


def fp8_available() -> bool:
    """Whether an FP8 library is installed and, on CUDA, the GPU computes in FP8 (compute capability 8.9+)."""
    if not any(is_installed(name) for name in ("torchao", "transformer_engine", "msamp")):
        return False
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability() >= (8, 9)
    return True
