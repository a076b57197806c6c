"""Reading and patching environment variables (Accelerate's helpers of ``accelerate.utils.environment``)."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from trainer.devices import accelerator_type

T = TypeVar("T")

_TRUE = ("y", "yes", "t", "true", "on", "1")
_FALSE = ("n", "no", "f", "false", "off", "0")


def str_to_bool(value: str, to_bool: bool = False) -> int | bool:
    """``"yes"``/``"true"``/``"on"``/``"1"`` → 1, ``"no"``/``"false"``/``"off"``/``"0"`` → 0 (bools with ``to_bool``)."""
    lowered = value.lower()
    if lowered in _TRUE:
        return True if to_bool else 1
    if lowered in _FALSE:
        return False if to_bool else 0
    raise ValueError(f"invalid truth value {value!r}: use one of {', '.join(_TRUE + _FALSE)}.")


def parse_flag_from_env(key: str, default: bool = False) -> bool:
    """The variable ``key`` read as a yes/no flag (``default`` when unset)."""
    return str_to_bool(os.environ.get(key, str(default))) == 1


def parse_choice_from_env(key: str, default: str = "no") -> str:
    return os.environ.get(key, str(default))


def get_int_from_env(env_keys: Iterable[str], default: int) -> int:
    """The first of ``env_keys`` that holds a non-negative whole number, else ``default``."""
    for key in env_keys:
        value = int(os.environ.get(key, -1))
        if value >= 0:
            return value
    return default


@contextmanager
def clear_environment() -> Iterator[None]:
    """Run the block with an empty ``os.environ``; the variables are back afterwards."""
    saved = dict(os.environ)
    os.environ.clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def patch_environment(**kwargs: Any) -> Iterator[None]:
    """Set ``KEY=value`` (keys upper-cased) for the block; what they were before is restored afterwards."""
    saved: dict[str, str | None] = {}
    for key, value in kwargs.items():
        key = key.upper()
        saved[key] = os.environ.get(key)
        os.environ[key] = str(value)
    try:
        yield
    finally:
        for key, previous in saved.items():
            if previous is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = previous


def convert_dict_to_env_variables(current_env: dict[str, str]) -> list[str]:
    """``KEY=value`` lines for an environment file; keys or values that would break the file are refused."""
    lines = []
    for key, value in current_env.items():
        if not key or "=" in key or "\n" in key or "\n" in str(value):
            raise ValueError(f"convert_dict_to_env_variables: {key!r}={value!r} cannot be written as one KEY=value line.")
        lines.append(f"{key}={value}\n")
    return lines


def purge_accelerate_environment(func_or_cls: T) -> T:
    """Decorate a function (or each ``test*`` method of a class) so ``TRAINER_*`` variables it sets are removed after."""
    if inspect.isclass(func_or_cls):
        for name, member in list(vars(func_or_cls).items()):
            if name.startswith("test") and callable(member):
                setattr(func_or_cls, name, purge_accelerate_environment(member))
        return func_or_cls
    function: Callable[..., Any] = func_or_cls  # type: ignore[assignment]

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = {key for key in os.environ if key.startswith("TRAINER_")}
        try:
            return function(*args, **kwargs)
        finally:
            for key in [key for key in os.environ if key.startswith("TRAINER_") and key not in before]:
                del os.environ[key]

    return wrapper  # type: ignore[return-value]


@dataclass
class CPUInformation:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def get_cpu_distributed_information() -> CPUInformation:
    """Rank, world size, local rank and local world size from the launcher's variables (torchrun, MPI, Slurm)."""
    return CPUInformation(
        rank=get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID"], 0),
        world_size=get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                                     "SLURM_NTASKS"], 1),
        local_rank=get_int_from_env(["LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                                     "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"], 0),
        local_world_size=get_int_from_env(["LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                           "MV2_COMM_WORLD_LOCAL_SIZE"], 1))


def get_current_device_type() -> tuple[str, str]:
    """This machine's accelerator type and its torch module path, e.g. ``("cuda", "torch.cuda")`` (``"cpu"`` if none)."""
    kind = accelerator_type() or "cpu"
    return kind, f"torch.{kind}"


def get_torch_accelerator_backend(check_available: bool = True) -> tuple[str | None, Any]:
    """This machine's accelerator type and torch's module for it, e.g. ``("cuda", torch.cuda)``; ``(None, None)``
    without one. ``check_available=False`` names the type without initialising the device (before a fork)."""
    import torch

    device = torch.accelerator.current_accelerator(check_available=check_available)
    if device is None:
        return None, None
    return device.type, torch.get_device_module(device)


def get_accelerator_free_memory(device_module: Any, device_index: int) -> int:
    """Free bytes on accelerator ``device_index``, asked through ``device_module`` (from ``get_torch_accelerator_backend``)."""
    import torch

    if device_module is torch.accelerator and hasattr(torch.accelerator, "get_memory_info"):
        return int(torch.accelerator.get_memory_info(device_index)[0])
    if device_module is torch.accelerator:
        device_module = torch.get_device_module(torch.accelerator.current_accelerator())
    return int(device_module.mem_get_info(device_index)[0])


def get_distributed_backend(device_type: str | None) -> str | None:
    """The collective backend torch recommends for ``device_type`` (``"gloo"`` for ``"cpu"``, ``"nccl"`` for
    ``"cuda"``...), or None where there is none."""
    import torch

    from trainer.devices import backend_for

    if device_type is None:
        return None
    try:
        return backend_for(torch.device(device_type))
    except (ValueError, RuntimeError):
        return None


def check_os_kernel() -> None:
    """Warn on Linux kernels older than 5.5, where processes can hang (as Accelerate warns)."""
    import platform
    import warnings

    if platform.system() != "Linux":
        return
    release = platform.release().split("-")[0].split(".")
    try:
        major, minor = int(release[0]), int(release[1])
    except (IndexError, ValueError):
        return
    if (major, minor) < (5, 5):
        warnings.warn(f"Linux kernel {platform.release()} is older than 5.5: processes may hang; upgrade the kernel.",
                      stacklevel=2)


__all__ = ["CPUInformation", "check_os_kernel", "clear_environment", "convert_dict_to_env_variables",
           "get_cpu_distributed_information", "get_current_device_type", "get_int_from_env", "parse_choice_from_env",
           "parse_flag_from_env", "patch_environment", "purge_accelerate_environment", "str_to_bool"]
