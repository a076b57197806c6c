"""Profiler: ``torch.profiler`` over the training steps, traces for TensorBoard and Perfetto."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity

from .base import Callback

if TYPE_CHECKING:
    from .protocols import TrainerView

DEFAULT_SCHEDULE: Mapping[str, int] = MappingProxyType({"wait": 1, "warmup": 1, "active": 3, "repeat": 1})
SCHEDULE_KEYS = ("wait", "warmup", "active", "repeat", "skip_first")
ACTIVITIES = {"cpu": ProfilerActivity.CPU, "cuda": ProfilerActivity.CUDA,
              **({"xpu": ProfilerActivity.XPU} if hasattr(ProfilerActivity, "XPU") else {})}


def auto_activities() -> list[ProfilerActivity]:
    """The CPU, and the accelerator there is (CUDA or XPU) when it is available."""
    found = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        found.append(ProfilerActivity.CUDA)
    elif "xpu" in ACTIVITIES and hasattr(torch, "xpu") and torch.xpu.is_available():
        found.append(ACTIVITIES["xpu"])
    return found


def _check_schedule(schedule: Any) -> dict[str, int] | None:
    if schedule is None:
        return None
    if not isinstance(schedule, Mapping) or set(schedule) - set(SCHEDULE_KEYS) or "active" not in schedule:
        raise ValueError(f"Profiler(schedule={schedule!r}): use a dict with keys among {', '.join(SCHEDULE_KEYS)} "
                         "('active' required), such as dict(wait=1, warmup=1, active=3, repeat=1); or None to "
                         "profile every step of fit.")
    for key, value in schedule.items():
        least = 1 if key == "active" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"Profiler(schedule={dict(schedule)!r}): {key} must be a whole number >= {least}.")
    return {"wait": 0, "warmup": 0, **schedule}  # torch.profiler.schedule requires both


def _check_activities(activities: Any) -> list[ProfilerActivity] | None:
    if activities == "auto":
        return None
    names = [activities] if isinstance(activities, (str, ProfilerActivity)) else activities
    if not isinstance(names, Iterable) or not names:
        names = [None]
    chosen = []
    for name in names:
        if isinstance(name, ProfilerActivity):
            chosen.append(name)
        elif isinstance(name, str) and name.lower() in ACTIVITIES:
            chosen.append(ACTIVITIES[name.lower()])
        else:
            raise ValueError(f"Profiler(activities={activities!r}): use 'auto', or a list of {', '.join(ACTIVITIES)} "
                             "(or torch.profiler.ProfilerActivity values).")
    return chosen


class Profiler(Callback):
    """Profile training steps with ``torch.profiler`` and write Chrome traces that TensorBoard and Perfetto read.

    The profiler starts when ``fit`` begins and steps after each optimizer step, so the schedule
    counts optimizer steps: with the default it skips one step, warms up over one and records
    three. Each recorded cycle is written by ``torch.profiler.tensorboard_trace_handler`` to
    ``<dirpath>/<host>_<pid>.<time>.pt.trace.json`` (one file per process and cycle). View them
    with ``tensorboard --logdir <dirpath>`` (the torch-tb-profiler plugin) or open one in
    https://ui.perfetto.dev.

    Args:
        schedule: ``torch.profiler.schedule`` arguments, in optimizer steps (``wait``, ``warmup``,
            ``active``, ``repeat``, ``skip_first``; ``repeat=0`` cycles until ``fit`` ends); None
            records every step of ``fit`` into one trace.
        dirpath: where the traces go; default ``output_dir/profiler``.
        activities: ``"auto"`` (the CPU, and CUDA or XPU when available) or a list of ``"cpu"``,
            ``"cuda"``, ``"xpu"``.
        record_shapes: record the input shapes of each operator.
        profile_memory: record tensor allocations and frees.
        with_stack: record the Python stack of each operator (larger traces).

    ``fit`` ending inside a recorded cycle writes what that cycle has so far. ``trace_files``
    lists the traces of the last ``fit``.
    """

    def __init__(self, schedule: Mapping[str, int] | None = DEFAULT_SCHEDULE, dirpath: str | Path | None = None,
                 activities: Any = "auto", record_shapes: bool = False, profile_memory: bool = False,
                 with_stack: bool = False) -> None:
        self.schedule = _check_schedule(schedule)
        self.activities = _check_activities(activities)
        for name, flag in (("record_shapes", record_shapes), ("profile_memory", profile_memory),
                           ("with_stack", with_stack)):
            if not isinstance(flag, bool):
                raise ValueError(f"Profiler({name}={flag!r}): use True or False.")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack
        self.trace_files: list[Path] = []
        self._profiler: torch.profiler.profile | None = None
        self._existing: set[Path] = set()

    def root(self, trainer: TrainerView) -> Path:
        """Where the traces go."""
        return self.dirpath if self.dirpath is not None else trainer.output_dir / "profiler"

    def on_fit_start(self, trainer: TrainerView) -> None:
        """``fit`` begins: start the profiler."""
        root = self.root(trainer)
        root.mkdir(parents=True, exist_ok=True)
        self._existing = set(root.glob("*.pt.trace.json*"))
        self.trace_files = []
        self._profiler = torch.profiler.profile(
            activities=self.activities or auto_activities(),
            schedule=torch.profiler.schedule(**self.schedule) if self.schedule is not None else None,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(root)),
            record_shapes=self.record_shapes, profile_memory=self.profile_memory, with_stack=self.with_stack)
        self._profiler.start()

    def on_train_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After each optimizer step: advance the profiler's schedule (a recorded cycle that ends is written)."""
        if self._profiler is not None and trainer.accelerator.sync_gradients:
            self._profiler.step()

    def on_fit_end(self, trainer: TrainerView) -> None:
        """``fit`` finished: stop the profiler (writing a cycle still being recorded) and list the traces."""
        self._stop(trainer)

    def on_exception(self, trainer: TrainerView, exception: BaseException) -> None:
        """``fit`` is failing: stop the profiler, writing what it recorded."""
        self._stop(trainer)

    def _stop(self, trainer: TrainerView) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            profiler.stop()
        self.trace_files = sorted(set(self.root(trainer).glob("*.pt.trace.json*")) - self._existing)
