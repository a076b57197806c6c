"""The model and data shared by the two-process DDP worker and the one-process reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

STEPS = 20


def make_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    samples = 2 * 8 * 4 * STEPS  # enough for 20 steps of 2 x 8 x accumulation 4
    return TensorDataset(torch.randn(samples, 6, generator=generator), torch.randint(0, 3, (samples,), generator=generator))


def train_steps(accelerator, model, optimizer, loader, steps: int = STEPS) -> None:
    """The loop every run shares: micro-batches under accumulate() until ``steps`` optimizer steps."""
    done = 0
    while done < steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                done += 1
                if done == steps:
                    return
