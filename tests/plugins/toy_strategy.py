"""A strategy from outside the project: data parallel with gradients all-reduced by hand after backward.

It is made known the way an installed package makes its strategy known, by an entry point in the
``trainer.strategies`` group (the tests write the package's metadata beside this file), and
nothing under trainer/, callbacks/ or strategies/ names it. It imports the framework through the
names a user's own ``strategies.py`` cannot shadow.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.strategies import Option, Strategy, StrategySpec


class Toy(Strategy):
    """Every process holds the whole model; after each backward the gradients are summed or averaged over processes.

    Args:
        reduce: ``"mean"`` (average the gradients: N processes train like one on the N-times larger
            batch) or ``"sum"``.
        broadcast_from: the process whose initial weights every process starts from.
    """

    spec = StrategySpec(
        name="toy", summary="data parallel with gradients all-reduced by hand after each backward",
        distributed_types=("TOY",), section="toy_config",
        options=(
            Option("toy_reduce", "reduce", (str,), "How gradients are combined over processes.", choices=("mean", "sum"),
                   question="Combine gradients by?"),
            Option("toy_broadcast_from", "broadcast_from", (int,), "The process whose initial weights everyone starts from.",
                   minimum=0),
        ))

    def __init__(self, reduce: str = "mean", broadcast_from: int = 0) -> None:
        super().__init__()
        if reduce not in ("mean", "sum"):
            raise ValueError(f"Toy(reduce={reduce!r}): use 'mean' or 'sum'.")
        self.reduce, self.broadcast_from = reduce, broadcast_from

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Move the model to the device and start every process from one process's weights."""
        module = module.to(self.root_device)
        if self.is_distributed:
            for tensor in (*module.parameters(), *module.buffers()):
                dist.broadcast(tensor.data, src=self.broadcast_from)
        return module

    def backward(self, loss: torch.Tensor, module: nn.Module | None = None, **kwargs: Any) -> None:
        """Backward, then every gradient combined over the processes."""
        loss.backward(**kwargs)
        if not self.is_distributed or module is None:
            return
        for parameter in module.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                if self.reduce == "mean":
                    parameter.grad /= self.num_processes
