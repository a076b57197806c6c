"""The strategies this installation knows, by name, and turning a name into a Strategy object, once.

Three kinds of strategy are known: the built-in ones, those a program registers with
``register_strategy``, and those installed packages declare under the ``trainer.strategies``
entry-point group (read the first time a name is not found among the others, or when the whole
list is asked for), so that a YAML file, ``trainer launch`` and ``trainer config`` know them too:

    # pyproject.toml of a package that ships a strategy
    [project.entry-points."trainer.strategies"]
    toy = "toy_strategy:Toy"
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from .base import Strategy
from .ddp import DDP
from .deepspeed import DeepSpeed
from .fsdp import FSDP
from .megatron import Megatron
from .single_device import SingleDevice
from .spec import StrategySpec
from .xla import XLA

ENTRY_POINT_GROUP = "trainer.strategies"
BUILT_IN: tuple[type[Strategy], ...] = (SingleDevice, DDP, FSDP, DeepSpeed, Megatron, XLA)

_CLASSES: dict[str, type[Strategy]] = {}  # canonical name -> class
_NAMES: dict[str, str] = {}  # every name of a strategy (aliases, distributed types in lower case) -> canonical name
_TYPES: dict[str, str] = {}  # a launch configuration's distributed_type -> canonical name
_plugins_read = False


def register_strategy(strategy: type[Strategy]) -> type[Strategy]:
    """Make ``strategy`` known by the names, distributed types, section and flags its ``spec`` declares.

    Usable as a class decorator. Registering the same class again does nothing; a name, a
    ``distributed_type``, a section or a launch flag that another strategy already has is one
    ValueError saying which.
    """
    if not (isinstance(strategy, type) and issubclass(strategy, Strategy)):
        raise TypeError(f"register_strategy() takes a Strategy subclass, got {strategy!r}.")
    spec = strategy.__dict__.get("spec")
    if not isinstance(spec, StrategySpec):
        raise TypeError(f"{strategy.__name__} has no spec of its own: give the class `spec = StrategySpec(name=..., "
                        "summary=...)` describing its names, section and options.")
    if _CLASSES.get(spec.name) is strategy:
        return strategy
    others = [cls.spec for cls in _CLASSES.values()]
    for name in spec.names:
        if name in _NAMES or name == "auto":
            raise ValueError(f"Strategy name {name!r} of {strategy.__name__} already means {_NAMES.get(name, 'auto')!r}.")
    for kind in spec.distributed_types:
        if kind in _TYPES:
            raise ValueError(f"distributed_type {kind!r} of {strategy.__name__} already selects {_TYPES[kind]!r}.")
    for other in others:
        if spec.section is not None and spec.section == other.section:
            raise ValueError(f"The launch-configuration section {spec.section!r} of {strategy.__name__} is already "
                             f"{other.name!r}'s.")
        clash = set(_flags(spec)) & set(_flags(other))
        if clash:
            raise ValueError(f"The trainer launch flag(s) {sorted(clash)} of {strategy.__name__} are already "
                             f"{other.name!r}'s: rename the option, or give it Option(flag=False).")
    _CLASSES[spec.name] = strategy
    _NAMES.update(dict.fromkeys(spec.names, spec.name))
    _TYPES.update(dict.fromkeys(spec.distributed_types, spec.name))
    return strategy


def _flags(spec: StrategySpec) -> list[str]:
    return [*([spec.flag] if spec.flag else []), *(o.key for o in spec.options if o.flag and o.argument is not None)]


def _read_plugins() -> None:
    """Register the strategies that installed packages declare (once)."""
    global _plugins_read
    if _plugins_read:
        return
    _plugins_read = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            strategy = point.load()
        except Exception as error:
            raise ImportError(f"The strategy {point.name!r} that an installed package declares ({point.value}, entry "
                              f"point group {ENTRY_POINT_GROUP!r}) cannot be imported: {error}. Fix or uninstall that "
                              "package.") from error
        register_strategy(strategy)


def strategy_class(strategy: str) -> type[Strategy]:
    """The class of the strategy called ``strategy`` (any of its names); an unknown name is one ValueError."""
    name = canonical_name(strategy)
    if name == "auto":
        raise ValueError("strategy 'auto' is no one strategy: it picks single_device or ddp by the process count.")
    return _CLASSES[name]


def strategy_classes() -> list[type[Strategy]]:
    """Every known strategy class, built-in ones first."""
    _read_plugins()
    return list(_CLASSES.values())


def strategy_specs() -> list[StrategySpec]:
    """The ``spec`` of every known strategy, built-in ones first."""
    return [cls.spec for cls in strategy_classes()]


def available_strategies() -> list[str]:
    """The names ``strategy=`` accepts: ``"auto"`` and every strategy's canonical name."""
    return ["auto", *(spec.name for spec in strategy_specs())]


def distributed_types() -> tuple[str, ...]:
    """Every ``distributed_type`` a launch configuration may name."""
    return tuple(kind for spec in strategy_specs() for kind in spec.distributed_types)


def strategy_for_distributed_type(kind: str) -> type[Strategy]:
    """The strategy a launch configuration's ``distributed_type`` selects."""
    if kind not in _TYPES:
        _read_plugins()
    if kind not in _TYPES:
        raise ValueError(f"No strategy runs distributed_type {kind!r}; known: {', '.join(distributed_types())}.")
    return _CLASSES[_TYPES[kind]]


def canonical_name(strategy: str | None) -> str:
    """``"auto"`` or a strategy's canonical name for any of its names; an unknown name is one ValueError."""
    name = (strategy or "auto").strip().lower()
    if name == "auto":
        return name
    if name not in _NAMES:
        _read_plugins()
    if name in _NAMES:
        return _NAMES[name]
    close = difflib.get_close_matches(name, [*available_strategies(), *_NAMES], n=1)
    hint = f" Did you mean {_NAMES.get(close[0], close[0])!r}?" if close else ""
    raise ValueError(f"Unknown strategy {strategy!r}; valid values: {available_strategies()}.{hint}")


def check_strategy_requirements(strategy: str | Strategy | None) -> None:
    """Raise a named strategy's unknown-name or missing-package error now, before a process group or a device is touched."""
    if isinstance(strategy, Strategy):
        return
    name = canonical_name(strategy)
    if name == "auto":
        return
    package = _CLASSES[name].spec.package
    if package is not None:
        package.require(f"strategy={name!r}")


def launch_settings(environ: Mapping[str, str] | None = None) -> dict[str, dict]:
    """The options ``trainer launch`` handed over for each strategy (``TRAINER_FSDP_CONFIG``...), by strategy name."""
    environ = os.environ if environ is None else environ
    return {spec.name: section for spec in strategy_specs() if (section := _launched_section(spec, environ)) is not None}


def _launched_section(spec: StrategySpec, environ: Mapping[str, str]) -> dict | None:
    """The section ``trainer launch`` handed over for ``spec``'s strategy, or None."""
    variable = spec.environment_variable
    return json.loads(environ[variable]) if variable is not None and environ.get(variable) else None


def resolve_strategy(strategy: str | Strategy | None, num_processes: int,
                     settings: Mapping[str, Mapping] | None = None,
                     arguments: Mapping[str, Mapping[str, Any]] | None = None) -> Strategy:
    """The Strategy for ``strategy`` given how many processes the job runs.

    ``"auto"`` is one device for one process and DDP for several. ``settings`` maps a strategy
    name to the options a launch configuration gave it (``{"fsdp": {"fsdp_sharding_strategy":
    "FULL_SHARD"}}``); by default they are read from what ``trainer launch`` handed over.
    ``arguments`` maps a strategy name to constructor arguments given in code (a plugin's fields),
    which win over the launch configuration's.
    """
    if isinstance(strategy, Strategy):
        return strategy
    name = canonical_name(strategy)
    if name == "auto":
        name = SingleDevice.spec.name if num_processes == 1 else DDP.spec.name
    cls = _CLASSES[name]
    options = _launched_section(cls.spec, os.environ) if settings is None else settings.get(name)
    given = dict((arguments or {}).get(name, {}))
    if options is None:
        return cls(**given)
    return cls(**{**cls.spec.arguments(options), **given})


for _strategy in BUILT_IN:
    register_strategy(_strategy)
