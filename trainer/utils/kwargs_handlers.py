"""Kwargs handlers: the small objects ``Accelerator(kwargs_handlers=[...])`` takes, with Accelerate's names and fields.

Each handler configures one part of the run and the Accelerator hands its fields to the part that
owns them (``trainer.accelerator_settings``): ``DistributedDataParallelKwargs`` to the DDP strategy,
``GradScalerKwargs`` to the fp16 policy's scaler, ``AutocastKwargs`` to the precision policy's
autocast, ``InitProcessGroupKwargs`` to ``PartialState``. A field with no equivalent here is one
error naming it when the Accelerator is built, never dropped.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from trainer.utils.enums import DDPCommunicationHookType


class KwargsHandler:
    """Base of the handlers: ``to_kwargs()`` is what was set, the fields that differ from the class's defaults."""

    def to_dict(self) -> dict[str, Any]:
        """Every field with its value (a deep copy)."""
        return copy.deepcopy({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})  # type: ignore[arg-type]

    def to_kwargs(self) -> dict[str, Any]:
        """The fields whose values differ from the defaults of this class."""
        defaults = type(self)().to_dict()
        return {name: value for name, value in self.to_dict().items() if defaults[name] != value}


@dataclass
class AutocastKwargs(KwargsHandler):
    """Arguments of ``torch.autocast`` for the prepared models' forward (and ``accelerator.autocast()``)."""

    enabled: bool = True
    cache_enabled: bool | None = None


@dataclass
class DistributedDataParallelKwargs(KwargsHandler):
    """How models are wrapped in ``DistributedDataParallel`` (the DDP strategy's options).

    ``dim`` and ``check_reduction`` have no effect in a process-per-device DDP and must keep their
    defaults; ``comm_hook`` (and for PowerSGD ``comm_wrapper`` and ``comm_state_option``) picks a
    gradient compression hook.
    """

    dim: int = 0
    broadcast_buffers: bool = True
    bucket_cap_mb: int = 25
    find_unused_parameters: bool = False
    check_reduction: bool = False
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    comm_hook: DDPCommunicationHookType = DDPCommunicationHookType.NO
    comm_wrapper: DDPCommunicationHookType = DDPCommunicationHookType.NO
    comm_state_option: dict[str, Any] = field(default_factory=dict)

    def strategy_arguments(self) -> dict[str, Any]:
        """The DDP strategy's constructor arguments these fields set."""
        if self.dim != 0:
            raise ValueError(f"DistributedDataParallelKwargs(dim={self.dim}) has no effect with one process per device "
                             "(DDP scatters no inputs then): leave dim at 0.")
        if self.check_reduction:
            raise ValueError("DistributedDataParallelKwargs(check_reduction=True): torch no longer checks reductions "
                             "(the argument is deprecated there); use find_unused_parameters=True to find parameters "
                             "that get no gradient.")
        hook = DDPCommunicationHookType(self.comm_hook)
        wrapper = DDPCommunicationHookType(self.comm_wrapper)
        return {"broadcast_buffers": self.broadcast_buffers, "bucket_cap_mb": self.bucket_cap_mb,
                "find_unused_parameters": self.find_unused_parameters,
                "gradient_as_bucket_view": self.gradient_as_bucket_view, "static_graph": self.static_graph,
                "comm_hook": None if hook is DDPCommunicationHookType.NO else hook.value,
                "comm_wrapper": None if wrapper is DDPCommunicationHookType.NO else wrapper.value,
                "comm_state_option": dict(self.comm_state_option)}


@dataclass
class GradScalerKwargs(KwargsHandler):
    """Arguments of the fp16 policy's ``torch.amp.GradScaler``."""

    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    enabled: bool = True


@dataclass
class InitProcessGroupKwargs(KwargsHandler):
    """How the process group is created: ``backend`` (only when set), ``timeout`` for every collective.

    A rank that waits longer than ``timeout`` in a collective (its peer died or hung) fails instead
    of waiting for ever; the default is torch's for the backend.
    """

    backend: str | None = "nccl"
    init_method: str | None = None
    timeout: timedelta | None = None

    def state_arguments(self) -> dict[str, Any]:
        """``PartialState``'s arguments: the backend only when it was set, the timeout when given."""
        if self.init_method is not None:
            raise ValueError(f"InitProcessGroupKwargs(init_method={self.init_method!r}): the processes find each other "
                             "through the launcher's environment (MASTER_ADDR, MASTER_PORT); leave init_method unset "
                             "and give trainer launch --main_process_ip / --main_process_port instead.")
        if self.timeout is not None and not isinstance(self.timeout, timedelta):
            raise TypeError(f"InitProcessGroupKwargs(timeout={self.timeout!r}): give a datetime.timedelta.")
        set_fields = self.to_kwargs()
        arguments: dict[str, Any] = {}
        if "backend" in set_fields:
            arguments["backend"] = self.backend
        if self.timeout is not None:
            arguments["timeout"] = self.timeout
        return arguments


PROFILER_ACTIVITIES = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU", "hpu": "HPU", "mtia": "MTIA"}


@dataclass
class ProfileKwargs(KwargsHandler):
    """``torch.profiler`` settings for ``accelerator.profile()``.

    Args:
        activities: what to record: ``"cpu"``, ``"cuda"``, ``"xpu"``, ``"hpu"``, ``"mtia"`` (default: what
            torch finds).
        schedule_option: ``torch.profiler.schedule``'s arguments (``wait``, ``warmup``, ``active``,
            ``repeat``, ``skip_first``); then call ``prof.step()`` once per step.
        on_trace_ready: called with the profiler each time a scheduled cycle ends.
        record_shapes: record the input shapes of operators (as ``torch.profiler.profile``'s).
        profile_memory: record tensor memory allocations.
        with_stack: record the source location of each operator.
        with_flops: estimate the floating-point operations of matrix and convolution operators.
        with_modules: record the module hierarchy of each operator.
        output_trace_dir: on exit, each process writes its Chrome trace ``profile_<rank>.json`` here.
    """

    activities: list[str] | None = None
    schedule_option: dict[str, int] | None = None
    on_trace_ready: Any = None
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False
    with_flops: bool = False
    with_modules: bool = False
    output_trace_dir: str | None = None

    def __post_init__(self) -> None:
        for activity in self.activities or ():
            if activity not in PROFILER_ACTIVITIES:
                raise ValueError(f"ProfileKwargs(activities=[{activity!r}]): not a profiler activity; use "
                                 f"{', '.join(map(repr, PROFILER_ACTIVITIES))}.")

    def build(self) -> Any:
        """A ``torch.profiler.profile`` with these settings (not started)."""
        import torch.profiler

        activities = None
        if self.activities is not None:
            kinds = torch.profiler.ProfilerActivity
            missing = [name for name in self.activities if not hasattr(kinds, PROFILER_ACTIVITIES[name])]
            if missing:
                raise ValueError(f"ProfileKwargs(activities={missing}): this torch build cannot profile them.")
            activities = [getattr(kinds, PROFILER_ACTIVITIES[name]) for name in self.activities]
        schedule = torch.profiler.schedule(**self.schedule_option) if self.schedule_option is not None else None
        return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self.on_trace_ready,
                                      record_shapes=self.record_shapes, profile_memory=self.profile_memory,
                                      with_stack=self.with_stack, with_flops=self.with_flops,
                                      with_modules=self.with_modules)
