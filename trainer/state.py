"""``PartialState``: the process-wide facts (which device, which rank, how many ranks).

Every ``PartialState()`` in a process shares one set of attributes, so a library, a data
script and the training loop can each create one and agree. The first creation reads the
launcher's environment and starts the process group; later ones only read.
"""

from __future__ import annotations

import builtins
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from trainer import launch_environment as variables
from trainer.cluster import ClusterEnvironment, detect_cluster_environment
from trainer.devices import accelerator_type, backend_for, env_flag, select_device
from trainer.strategies import registry
from trainer.strategies.ddp import multi_device_type
from trainer.utils.enums import DistributedType, as_distributed_type

F = TypeVar("F", bound=Callable[..., Any])



class PartialState:
    """Device and rank layout of this process, shared by every instance (a Borg).

    Args:
        cpu: run on the CPU even where an accelerator is present (also ``TRAINER_USE_CPU=1``).
        backend: the collective backend; by default the one torch recommends for the device.
        timeout: how long a collective may wait before the job fails.
    """

    _shared_state: dict[str, Any] = {}

    def __init__(self, cpu: bool = False, backend: str | None = None,
                 timeout: timedelta | None = None) -> None:
        self.__dict__ = self._shared_state
        if self.initialized:
            if cpu and self.device.type != "cpu":
                raise RuntimeError(
                    "PartialState was already created on "
                    f"{self.device}; pass cpu=True to the first PartialState()/Accelerator() "
                    "of the process (or set TRAINER_USE_CPU=1) to run on the CPU."
                )
            return
        cluster = detect_cluster_environment()
        self.cluster: ClusterEnvironment = cluster
        self.device: torch.device = select_device(cluster.local_rank, cpu=cpu or env_flag(variables.USE_CPU))
        self.backend: str | None = None
        if cluster.is_distributed:
            self.backend = backend or backend_for(self.device)
            if timeout is None and os.environ.get(variables.PROCESS_GROUP_TIMEOUT):  # what trainer launch was given
                timeout = timedelta(seconds=float(os.environ[variables.PROCESS_GROUP_TIMEOUT]))
            self._init_process_group(cluster, self.backend, timeout)
        elif dist.is_available() and dist.is_initialized():
            self.backend = dist.get_backend()

    @staticmethod
    def _init_process_group(cluster: ClusterEnvironment, backend: str, timeout: timedelta | None) -> None:
        if dist.is_initialized():
            return
        os.environ.setdefault("MASTER_ADDR", cluster.master_addr)
        os.environ.setdefault("MASTER_PORT", str(cluster.master_port))
        kwargs: dict[str, Any] = {"backend": backend, "rank": cluster.rank, "world_size": cluster.world_size}
        if timeout is not None:
            kwargs["timeout"] = timeout
        dist.init_process_group(**kwargs)

    # -- facts ------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return "device" in self._shared_state

    @property
    def process_index(self) -> int:
        return self.cluster.rank

    @property
    def local_process_index(self) -> int:
        return self.cluster.local_rank

    @property
    def num_processes(self) -> int:
        return self.cluster.world_size

    @property
    def use_distributed(self) -> bool:
        return self.cluster.world_size > 1

    @property
    def distributed_type(self) -> DistributedType | str:
        """How the launch shares the work (a ``DistributedType``): the strategy ``trainer launch`` named, else
        ``NO`` for one process and ``MULTI_<device>`` for several (what ``"auto"`` picks)."""
        named = os.environ.get(variables.STRATEGY, "auto")
        if registry.canonical_name(named) != "auto":
            kind = registry.strategy_class(named).spec.distributed_types[0]
        else:
            kind = "NO" if self.num_processes == 1 else multi_device_type(self.device)
        return as_distributed_type(kind)

    @property
    def default_device(self) -> torch.device:
        """The device a process would take before any layout: the first accelerator present, else the CPU."""
        kind = accelerator_type()
        return torch.device("cpu" if kind is None else kind)

    def set_device(self) -> None:
        """Make this process's accelerator the current one (done when the state is created; for the scripts that call it)."""
        if self.device.type != "cpu" and self.device.index is not None:
            torch.accelerator.set_device_index(self.device.index)

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    @property
    def is_last_process(self) -> bool:
        return self.process_index == self.num_processes - 1

    def __repr__(self) -> str:
        return (f"PartialState(device={self.device}, process_index={self.process_index}, "
                f"num_processes={self.num_processes}, launcher={self.cluster.launcher!r}, "
                f"backend={self.backend!r})")

    # -- synchronisation ---------------------------------------------------------------------
    def wait_for_everyone(self) -> None:
        """Block until every process reaches this line."""
        if self.use_distributed:
            dist.barrier()

    @contextmanager
    def _goes_first(self, first: bool) -> Iterator[None]:
        if not first:
            self.wait_for_everyone()
        yield
        if first:
            self.wait_for_everyone()

    @contextmanager
    def main_process_first(self) -> Iterator[None]:
        """The main process runs the block, then the others (e.g. it builds a dataset cache they reuse)."""
        with self._goes_first(self.is_main_process):
            yield

    @contextmanager
    def local_main_process_first(self) -> Iterator[None]:
        """Like ``main_process_first`` but once per machine."""
        with self._goes_first(self.is_local_main_process):
            yield

    # -- running on some processes only -------------------------------------------------------
    def on_main_process(self, function: F) -> F:
        """Decorator: the function runs on the main process only and returns None elsewhere."""
        return _only_if(lambda: self.is_main_process, function)

    def on_local_main_process(self, function: F) -> F:
        return _only_if(lambda: self.is_local_main_process, function)

    def on_last_process(self, function: F) -> F:
        return _only_if(lambda: self.is_last_process, function)

    def on_local_process(self, function: F | None = None, local_process_index: int | None = None):
        """Decorator: run only on the process of each machine whose local index is ``local_process_index``."""
        if function is None:
            return functools.partial(self.on_local_process, local_process_index=local_process_index)
        return _only_if(lambda: self.local_process_index == local_process_index, function)

    def on_process(self, function: F | None = None, process_index: int | None = None):
        """Decorator: run only on ``process_index``; usable as ``@state.on_process(process_index=1)``."""
        if function is None:
            return functools.partial(self.on_process, process_index=process_index)
        return _only_if(lambda: self.process_index == process_index, function)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the main process only, so a message appears once however many ranks run."""
        if self.is_main_process:
            builtins.print(*args, **kwargs)

    # -- splitting work ------------------------------------------------------------------------
    @contextmanager
    def split_between_processes(self, inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
        """Yield this process's contiguous share of ``inputs``.

        Lists, tuples, tensors (along dim 0), ``datasets.Dataset`` and dicts of those (each value
        split alike) are supported. Shares differ in length by at most one; with
        ``apply_padding=True`` shorter shares repeat their last element so every process gets
        the same length (what a later ``gather`` needs), and the caller drops the repeats.
        """
        yield split_for_process(inputs, self.process_index, self.num_processes, apply_padding)

    # -- lifecycle -----------------------------------------------------------------------------
    def destroy_process_group(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        """Pickled, the state is "this process's state": unpickling gives the shared one of where it is loaded."""
        return type(self), ()

    @classmethod
    def _reset_state(cls, destroy_process_group: bool = False) -> None:
        """Forget the shared state (tests; a notebook that re-launches)."""
        if destroy_process_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        cls._shared_state.clear()


def _only_if(condition: Callable[[], bool], function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if condition():
            return function(*args, **kwargs)
        return None

    return wrapper  # type: ignore[return-value]


def share_bounds(length: int, index: int, count: int) -> tuple[int, int]:
    """The [start, end) of share ``index`` of ``count`` when ``length`` items are split contiguously."""
    base, extra = divmod(length, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def split_for_process(inputs: Any, index: int, count: int, apply_padding: bool = False) -> Any:
    """This process's share of ``inputs`` (see ``PartialState.split_between_processes``)."""
    if isinstance(inputs, Mapping):
        lengths = {len(v) for v in inputs.values()}
        if len(lengths) > 1:
            raise ValueError(
                "split_between_processes got a dict whose values have different lengths "
                f"({sorted(lengths)}); every value must have one entry per sample."
            )
        split = {k: split_for_process(v, index, count, apply_padding) for k, v in inputs.items()}
        return cast(Callable[[dict], Any], type(inputs))(split)  # the same kind of mapping
    if not hasattr(inputs, "__len__") or isinstance(inputs, (str, bytes)):
        raise TypeError(
            f"split_between_processes cannot split a {type(inputs).__name__}; pass a list, tuple, "
            "tensor, datasets.Dataset or a dict of those."
        )
    length = len(inputs)
    start, end = share_bounds(length, index, count)
    padding = (math.ceil(length / count) - (end - start)) if apply_padding else 0
    if isinstance(inputs, torch.Tensor):
        piece = inputs[start:end]
        if padding > 0 and length > 0:
            piece = torch.cat([piece, inputs[end - 1 if end > start else length - 1].unsqueeze(0).expand(
                padding, *inputs.shape[1:])])
        return piece
    if hasattr(inputs, "select") and hasattr(inputs, "column_names"):  # a datasets.Dataset
        rows = list(range(start, end))
        if padding > 0 and length > 0:
            rows += [rows[-1] if rows else length - 1] * padding
        return inputs.select(rows)
    if isinstance(inputs, Sequence):
        share = list(inputs[start:end])
        if padding > 0 and length > 0:
            share += [share[-1] if share else inputs[-1]] * padding
        return type(inputs)(share) if isinstance(inputs, tuple) else share
    raise TypeError(
        f"split_between_processes cannot split a {type(inputs).__name__}; pass a list, tuple, "
        "tensor, datasets.Dataset or a dict of those."
    )


def __getattr__(name: str) -> Any:
    """``AcceleratorState`` and ``GradientState`` live in trainer.accelerator_state (they subclass or read
    ``PartialState``); they are importable from here, Accelerate's path, without a circular import."""
    if name in ("AcceleratorState", "GradientState"):
        from trainer import accelerator_state

        return getattr(accelerator_state, name)
    raise AttributeError(f"module 'trainer.state' has no attribute {name!r}")
