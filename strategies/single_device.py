"""SingleDevice: one process on one device (a CPU, a GPU, an XPU...)."""

from __future__ import annotations

import torch

from .base import Strategy
from .spec import StrategySpec


class SingleDevice(Strategy):
    """Everything on one device; no wrapping, no collectives.

    Args:
        device: the device to use; by default the one the Accelerator's PartialState picked.
    """

    spec = StrategySpec(name="single_device", summary="one process on one device (a CPU, a GPU, an XPU...)",
                        aliases=("single", "cpu"), distributed_types=("NO",), launch_flag=None, picked_by_auto=True)

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__()
        self._requested = torch.device(device) if device is not None else None

    def setup_environment(self, device: torch.device, process_index: int = 0, num_processes: int = 1) -> None:
        if num_processes > 1:
            raise ValueError(
                f"SingleDevice runs one process but this job has {num_processes}; use "
                "strategy='ddp' (or 'auto') for multi-process training."
            )
        super().setup_environment(self._requested or device, process_index, num_processes)
