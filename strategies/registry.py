"""Turn a strategy name (``"auto"``, ``"single_device"``...) into a Strategy object, once."""

from __future__ import annotations

import difflib

from .base import Strategy
from .ddp import DDP
from .deepspeed import DeepSpeed, require_deepspeed
from .fsdp import FSDP
from .megatron import Megatron, require_megatron
from .single_device import SingleDevice
from .xla import XLA, require_xla

_BUILDERS = {"single_device": SingleDevice, "ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed, "megatron": Megatron, "xla": XLA}
# Names users know from other frameworks that mean the same strategy.
_ALIASES = {"single": "single_device", "no": "single_device", "cpu": "single_device", "multi_cpu": "ddp",
            "multi_gpu": "ddp", "multi_xpu": "ddp", "multi_npu": "ddp", "multi_mlu": "ddp", "multi_hpu": "ddp"}
# Strategies that this release does not ship yet.
_PLANNED: tuple[str, ...] = ()
# Strategies whose backend is an optional package: checked before any work starts.
_NEEDS_PACKAGE = {"deepspeed": require_deepspeed, "megatron": require_megatron, "xla": require_xla}


def available_strategies() -> list[str]:
    return ["auto", *_BUILDERS]


def _canonical(strategy: str | None) -> str:
    name = (strategy or "auto").strip().lower()
    return _ALIASES.get(name, name)


def check_strategy_requirements(strategy: str | Strategy | None) -> None:
    """Raise the missing-package error of a named strategy now, before a process group or a device is touched."""
    if isinstance(strategy, Strategy):
        return
    check = _NEEDS_PACKAGE.get(_canonical(strategy))
    if check is not None:
        check(f"strategy={_canonical(strategy)!r}")


def resolve_strategy(strategy: str | Strategy | None, num_processes: int,
                     settings: dict[str, dict] | None = None) -> Strategy:
    """The Strategy for ``strategy`` given how many processes the job runs.

    ``settings`` maps a strategy name to the options a launch configuration gave it
    (e.g. ``{"fsdp": {"fsdp_sharding_strategy": "FULL_SHARD"}}``).
    """
    if isinstance(strategy, Strategy):
        return strategy
    name = _canonical(strategy)
    if name == "auto":
        name = "single_device" if num_processes == 1 else "ddp"
    if name in _BUILDERS:
        options = (settings or {}).get(name)
        if options is not None and hasattr(_BUILDERS[name], "from_config"):
            return _BUILDERS[name].from_config(options)
        return _BUILDERS[name]()
    if name in _PLANNED:
        raise ValueError(
            f"strategy={name!r} is not available in this release (this job runs {num_processes} "
            f"process(es)); available: {available_strategies()}."
        )
    close = difflib.get_close_matches(name, [*available_strategies(), *_PLANNED], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown strategy {strategy!r}; valid values: {available_strategies()}.{hint}")
