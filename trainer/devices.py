"""Which device this process computes on, and which collective backend goes with it.

``torch.accelerator`` names the machine's accelerator (CUDA, XPU, MPS, NPU, MLU, ...) without
a branch per vendor; only the backend names that torch cannot tell us are listed here.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# Used only where torch.distributed has no default for a device type.
_FALLBACK_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl", "hpu": "hccl", "npu": "hccl",
                      "mlu": "cncl", "musa": "mccl", "mps": "gloo"}

_TRUE = {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def accelerator_type() -> str | None:
    """The device type of this machine's accelerator, or None when there is none."""
    if not torch.accelerator.is_available():
        return None
    current = torch.accelerator.current_accelerator()
    return None if current is None else current.type


def select_device(local_rank: int, cpu: bool = False) -> torch.device:
    """One device per local process: the accelerator indexed by local rank, else the CPU."""
    kind = None if cpu else accelerator_type()
    if kind is None:
        return torch.device("cpu")
    if kind == "mps":
        return torch.device("mps")
    count = torch.accelerator.device_count()
    device = torch.device(kind, local_rank % max(count, 1))
    torch.accelerator.set_device_index(device.index)
    return device


def backend_for(device: torch.device) -> str:
    """The collective backend torch recommends for this device type (gloo on CPU, nccl on CUDA...)."""
    try:
        return dist.get_default_backend_for_device(device)
    except (RuntimeError, ValueError, AttributeError):
        if device.type not in _FALLBACK_BACKENDS:
            raise ValueError(
                f"No collective backend is known for device type {device.type!r}; pass backend= "
                "explicitly (e.g. PartialState(backend='gloo'))."
            ) from None
        return _FALLBACK_BACKENDS[device.type]


def device_module(device: torch.device):
    """The ``torch.<type>`` module of a device (``torch.cuda``, ``torch.xpu``...), or None for CPU."""
    if device.type == "cpu":
        return None
    return getattr(torch, device.type, None)


def empty_cache() -> None:
    """Give cached accelerator memory back to the driver, on whatever accelerator there is."""
    if accelerator_type() is not None and hasattr(torch.accelerator, "empty_cache"):
        torch.accelerator.empty_cache()
