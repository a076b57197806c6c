"""Tracker names: ``"mlflow"``, ``"wandb"``... resolved to classes, plus user-registered ones.

The backend modules import their packages only when a run starts, so this table costs nothing
to build; a missing package is reported when a tracker is constructed.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

from .aim_tracker import AimTracker
from .base import Tracker
from .clearml_tracker import ClearMLTracker
from .comet_tracker import CometMLTracker
from .csv_tracker import CSVTracker
from .dvclive_tracker import DVCLiveTracker
from .mlflow_tracker import MLflowTracker
from .tensorboard_tracker import TensorBoardTracker
from .wandb_tracker import WandbTracker

TRACKERS: dict[str, type[Tracker]] = {
    cls.name: cls for cls in (AimTracker, ClearMLTracker, CometMLTracker, CSVTracker, DVCLiveTracker,
                              MLflowTracker, TensorBoardTracker, WandbTracker)
}
ALIASES = {"comet": "comet_ml", "tb": "tensorboard", "tensorboardx": "tensorboard"}


def register_tracker(cls: type[Tracker], name: str | None = None) -> type[Tracker]:
    """Make ``cls`` available by name (``trackers=["mine"]``, ``log_with="mine"``); usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Tracker)):
        raise TypeError(f"register_tracker takes a Tracker subclass, got {cls!r}.")
    key = (name or cls.name).lower()
    if not key:
        raise ValueError(f"{cls.__name__} has no name: set the class attribute name = '...' or pass name=.")
    TRACKERS[key] = cls
    return cls


def installed_trackers() -> list[str]:
    """The names of the trackers whose packages are installed."""
    return [name for name, cls in TRACKERS.items() if cls.requires is None or importlib.util.find_spec(cls.requires)]


def default_trackers() -> list[str]:
    """What a Trainer records with when no tracker is named: CSV, and MLflow (a local sqlite store) if installed.

    ``TRAINER_TRACKERS`` (comma-separated names, or ``none``) replaces this choice.
    """
    chosen = os.environ.get("TRAINER_TRACKERS")
    if chosen is not None:
        return [] if chosen.strip().lower() in ("", "none") else [n.strip() for n in chosen.split(",") if n.strip()]
    return ["csv"] + (["mlflow"] if importlib.util.find_spec("mlflow") else [])


def make_tracker(spec: Any, **options: Any) -> Tracker:
    """A Tracker from a name, a Tracker class, or an instance (returned as is)."""
    if isinstance(spec, Tracker):
        return spec
    if isinstance(spec, type) and issubclass(spec, Tracker):
        return spec(**options)
    name = getattr(spec, "value", spec)  # enum members, as in LoggerType.MLFLOW
    if not isinstance(name, str):
        raise TypeError(f"A tracker is a name like 'mlflow', a Tracker class or instance; got {spec!r}.")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TRACKERS:
        close = difflib.get_close_matches(key, list(TRACKERS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown tracker {name!r}.{hint} Known trackers: {', '.join(sorted(TRACKERS))} "
                         "(or register your own with callbacks.register_tracker).")
    return TRACKERS[key](**options)


# What ``log_with=`` and ``Trainer(trackers=)`` take: a name (``"mlflow"``, ``"all"``), a Tracker class or
# instance, an enum member whose ``value`` is a name (Accelerate's ``LoggerType.MLFLOW``), or a list of these.
TrackerSpec = str | Tracker | type[Tracker] | Enum
TrackersArgument = TrackerSpec | Sequence[TrackerSpec] | None


def make_trackers(specs: TrackersArgument, **options: Any) -> list[Tracker]:
    """Trackers from one spec or a list; ``"all"`` means every tracker whose package is installed."""
    if specs is None:
        return []
    given: Iterable[Any] = [specs] if isinstance(specs, (str, Tracker, type)) or hasattr(specs, "value") else specs
    names: list[Any] = []
    for spec in given:
        if getattr(spec, "value", spec) == "all":
            names.extend(installed_trackers())
        else:
            names.append(spec)
    trackers = [make_tracker(spec, **options) for spec in _unique(names)]
    return trackers


def _unique(specs: Iterable[Any]) -> list[Any]:
    seen, unique = set(), []
    for spec in specs:
        key = spec if not isinstance(spec, str) else ALIASES.get(spec.lower(), spec.lower())
        if key not in seen:
            seen.add(key)
            unique.append(spec)
    return unique
