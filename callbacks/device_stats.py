"""DeviceStatsMonitor: the process's CPU memory and load, and the accelerator's memory, every n steps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import psutil
import torch

from .base import Callback

if TYPE_CHECKING:
    from .protocols import TrainerView

PREFIX = "device_stats/"
MIB = 2**20


class _Placed(Protocol):
    @property
    def device(self) -> torch.device: ...


def accelerator_memory(device: torch.device) -> dict[str, float]:
    """Memory the caching allocator of ``device`` holds, in MiB (no synchronisation: host-side counters).

    Empty for a CPU, or for a device whose allocator does not report.
    """
    if device.type == "cpu":
        return {}
    memory: Any = getattr(torch, "accelerator", None)
    if memory is None or not hasattr(memory, "memory_allocated"):  # torch before 2.9
        memory = getattr(torch, device.type, None)
    try:
        values = {"allocated": memory.memory_allocated(device), "max_allocated": memory.max_memory_allocated(device),
                  "reserved": memory.memory_reserved(device)}
    except (AttributeError, RuntimeError, TypeError):
        return {}
    return {f"{device.type}_{name}_mib": value / MIB for name, value in values.items()}


class DeviceStatsMonitor(Callback):
    """Log memory and CPU use every ``log_every_n_steps`` optimizer steps.

    Logged, for this process:

    - ``device_stats/cpu_rss_mib``: resident memory of the process (psutil), in MiB;
    - ``device_stats/cpu_percent``: CPU use of the process since the previous log (100 = one core busy);
    - ``device_stats/<device>_allocated_mib``, ``..._max_allocated_mib`` (the peak since the process
      started), ``..._reserved_mib``: the accelerator's memory (``torch.accelerator``), when
      training runs on one.

    Args:
        log_every_n_steps: how often to log, in optimizer steps.

    Reading these costs a few microseconds and never waits for the device. Each process logs its
    own values; the trackers record the main process's.
    """

    def __init__(self, log_every_n_steps: int = 10) -> None:
        if not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 1:
            raise ValueError(f"DeviceStatsMonitor(log_every_n_steps={log_every_n_steps!r}): use a whole number >= 1.")
        self.log_every_n_steps = log_every_n_steps
        self._process: psutil.Process | None = None

    def on_fit_start(self, trainer: TrainerView) -> None:
        """``fit`` begins: start measuring the process's CPU use from here."""
        self._process = psutil.Process()  # this process: a callback made before a fork would name its parent
        self._process.cpu_percent(None)

    def on_train_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After every ``log_every_n_steps``-th optimizer step: log the statistics."""
        if trainer.accelerator.sync_gradients and trainer.global_step % self.log_every_n_steps == 0:
            trainer.log_dict({PREFIX + name: value for name, value in self.stats(trainer).items()})

    def stats(self, trainer: TrainerView) -> dict[str, float]:
        """The statistics now, by name (without the ``device_stats/`` prefix)."""
        if self._process is None:
            self._process = psutil.Process()
        values = {"cpu_rss_mib": self._process.memory_info().rss / MIB, "cpu_percent": self._process.cpu_percent(None)}
        values.update(accelerator_memory(cast(_Placed, trainer.accelerator).device))
        return values
