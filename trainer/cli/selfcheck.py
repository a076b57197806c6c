"""The script ``trainer test`` launches: a short check that the configured processes can work together."""

from __future__ import annotations

import os
import sys

import torch

from trainer import Accelerator


def main() -> None:
    accelerator = Accelerator()
    n = accelerator.num_processes
    rank = torch.tensor([float(accelerator.process_index)], device=accelerator.device)
    gathered = accelerator.gather(rank).tolist()
    total = accelerator.reduce(rank, "sum").item()
    if gathered != [float(i) for i in range(n)] or total != n * (n - 1) / 2:
        raise RuntimeError(f"self-check failed: gathered {gathered}, summed {total} on {n} process(es)")
    model = accelerator.prepare(torch.nn.Linear(4, 2))
    loss = model(torch.ones(3, 4, device=accelerator.device)).sum()
    accelerator.backward(loss)
    accelerator.print(f"self-check passed on {n} process(es): device {accelerator.device.type}, "
                      f"strategy {accelerator.strategy.name}, precision {accelerator.mixed_precision}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
    # The check is done: leave without interpreter teardown, where gloo's threads occasionally abort
    # a finished process on a loaded machine and would turn a passed check into a failed launch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
