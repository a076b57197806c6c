"""What a strategy says about itself, once: its names, the launch-configuration section it owns, its options, its package.

Every other place that must know these facts reads them from a strategy's ``spec``: the registry
(names and aliases), the launch configuration's validation (``distributed_type`` values, the
section's keys, types and allowed values), ``trainer launch`` (a flag to choose the strategy and
one per option), ``trainer config`` (its questions), the environment variable that carries the
section to the launched processes, ``Strategy.from_config`` and the documentation's configuration
page. Adding a strategy is its file plus ``register_strategy``; nothing else is edited.

    class Toy(Strategy):
        spec = StrategySpec(
            name="toy", summary="one replica per process, gradients averaged by hand",
            distributed_types=("TOY",), section="toy_config",
            options=(Option("toy_bucket_mb", "bucket_mb", (int,), "all-reduce bucket size in MB", minimum=1),),
        )
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Python types an option may hold, as the launch configuration and the docs name them.
TYPE_NAMES: dict[type, str] = {bool: "true/false", int: "a whole number", float: "a number", str: "a string",
                               list: "a list", dict: "a mapping", type(None): "null"}


@dataclass(frozen=True)
class Option:
    """One setting of a strategy, as a launch configuration spells it and as the constructor takes it.

    Args:
        key: the key in the strategy's section of the launch configuration (``fsdp_sharding_strategy``);
            also the name of its ``trainer launch`` flag (``--fsdp_sharding_strategy``).
        argument: the constructor argument it sets (``sharding_strategy``); None for a key that is
            accepted and has no effect here, with ``unused`` saying why.
        types: the Python types a value may have (``(int,)``, ``(str, int)``...).
        help: one line: what it does.
        choices: the allowed values, where they are a fixed set.
        minimum: the smallest allowed number, for numbers.
        question: the question ``trainer config`` asks for it; None: not asked.
        ask_default: the answer offered with the question (default: the constructor's default).
        flag: whether ``trainer launch`` has a flag for it (False where the name would clash with one
            of the launcher's own flags).
        unused: why a key without ``argument`` is accepted (files written elsewhere carry it).
    """

    key: str
    argument: str | None
    types: tuple[type, ...]
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: int | float | None = None
    question: str | None = None
    ask_default: Any = None
    flag: bool = True
    unused: str | None = None

    def check(self, value: Any, where: str) -> None:
        """Raise ValueError naming ``where``, the value and what is allowed, unless ``value`` fits."""
        check_value(value, self.types, where, self.choices, self.minimum)


def check_value(value: Any, types: tuple[type, ...], where: str, choices: tuple[Any, ...] | None = None,
                minimum: int | float | None = None) -> None:
    """One ValueError naming ``where``, the value and what is allowed, unless ``value`` has one of ``types``,
    is one of ``choices`` (when given) and is at least ``minimum`` (when given). ``True`` is no number here."""
    fits = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not fits:
        raise ValueError(f"{where}: expected {describe_types(types)}, got {value!r}.")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where}: {value!r} is not allowed.{hint} Allowed: {', '.join(map(str, choices))}.")
    if minimum is not None and isinstance(value, (int, float)) and value < minimum:
        raise ValueError(f"{where}: must be at least {minimum}, got {value!r}.")


def describe_types(types: tuple[type, ...]) -> str:
    """``"a whole number or null"`` for ``(int, type(None))``."""
    return " or ".join(dict.fromkeys(TYPE_NAMES.get(t, t.__name__) for t in types))


@dataclass(frozen=True)
class Package:
    """An optional package a strategy needs: the module it imports, the distribution, the install line."""

    module: str
    name: str
    install: str
    note: str = ""  # said after the install line (how to run it, which versions match)

    def available(self) -> bool:
        """Whether ``import module`` can succeed, without importing it (backends are slow to import).

        A ``None`` entry in ``sys.modules`` for the module or a parent marks it as unimportable.
        """
        parts = self.module.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name in sys.modules and sys.modules[name] is None:
                return False
        if self.module in sys.modules:
            return True
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def missing_message(self, what: str) -> str:
        """The one sentence that says ``what`` needs the package and how to install it."""
        return f"{what} needs {self.name}, which is not installed: {self.install}{self.note}"

    def require(self, what: str) -> None:
        """One clear ImportError, before any work, when the package cannot be imported."""
        if not self.available():
            raise ImportError(self.missing_message(what))


@dataclass(frozen=True)
class StrategySpec:
    """Everything the rest of the project knows about a strategy.

    Args:
        name: the canonical name (``Accelerator(strategy="fsdp")``, ``TRAINER_STRATEGY``).
        summary: one line for ``trainer launch --help`` and the docs.
        aliases: other names that mean it (lower case).
        distributed_types: the launch configuration's ``distributed_type`` values that select it;
            their lower-case spellings are names of the strategy too.
        section: the launch configuration's section that holds its options (``fsdp_config``).
        options: the keys of that section.
        package: an optional package it needs, checked before any work starts.
        launch_flag: the ``trainer launch`` flag that selects it; ``""`` means ``use_<name>``, None none.
        picked_by_auto: launched as ``"auto"``, which picks one device for one process and DDP for several.
    """

    name: str
    summary: str
    aliases: tuple[str, ...] = ()
    distributed_types: tuple[str, ...] = ()
    section: str | None = None
    options: tuple[Option, ...] = ()
    package: Package | None = None
    launch_flag: str | None = ""
    picked_by_auto: bool = False
    _by_key: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name != self.name.lower() or not self.name.isidentifier():
            raise ValueError(f"StrategySpec(name={self.name!r}): use a lower-case Python identifier.")
        by_key: dict[str, Option] = {}
        for option in self.options:
            if option.key in by_key:
                raise ValueError(f"Strategy {self.name!r} declares the option {option.key!r} twice.")
            if option.argument is None and not option.unused:
                raise ValueError(f"Strategy {self.name!r}: option {option.key!r} sets no argument; say why it is "
                                 "accepted (Option(unused=...)).")
            by_key[option.key] = option
        if self.options and self.section is None:
            raise ValueError(f"Strategy {self.name!r} has options but no launch-configuration section to hold them.")
        object.__setattr__(self, "_by_key", by_key)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that means this strategy: its name, its aliases, its distributed types in lower case."""
        return tuple(dict.fromkeys((self.name, *self.aliases, *(kind.lower() for kind in self.distributed_types))))

    @property
    def flag(self) -> str | None:
        """The ``trainer launch`` flag that selects it (without dashes), or None."""
        return f"use_{self.name}" if self.launch_flag == "" else self.launch_flag

    @property
    def environment_variable(self) -> str | None:
        """The variable that carries the section to the launched processes (``TRAINER_FSDP_CONFIG``)."""
        return None if self.section is None else f"TRAINER_{self.section.upper()}"

    def option(self, key: str) -> Option:
        """The option called ``key``; an unknown key is one ValueError with a did-you-mean."""
        if key in self._by_key:
            return self._by_key[key]
        close = difflib.get_close_matches(key, list(self._by_key), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        allowed = ", ".join(self._by_key) or "none"
        raise ValueError(f"Unknown {self.section or self.name} key {key!r}.{hint} Allowed: {allowed}.")

    def arguments(self, section: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments that a launch-configuration section sets (keys checked, unused keys dropped)."""
        arguments: dict[str, Any] = {}
        for key, value in section.items():
            option = self.option(key)
            option.check(value, f"{self.section}.{key}")
            if option.argument is not None:
                arguments[option.argument] = value
        return arguments
