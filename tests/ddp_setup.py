"""The model and data shared by the two-process DDP worker and the one-process reference."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

STEPS = 20


def make_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    samples = 2 * 8 * 4 * STEPS  # enough for 20 steps of 2 x 8 x accumulation 4
    return TensorDataset(torch.randn(samples, 6, generator=generator), torch.randint(0, 3, (samples,), generator=generator))
