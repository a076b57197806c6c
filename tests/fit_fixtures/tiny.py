"""Tiny pieces for ``trainer fit`` configs: ``fit_fixtures.tiny.TinyNet``, ``fit_fixtures.tiny:TinyTrainer``..."""

from __future__ import annotations

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainer import Trainer


class TinyNet(nn.Module):
    """A two-layer classifier."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_net(hidden: int = 16) -> nn.Module:
    """A TinyNet made by a function (a config's model may name either)."""
    return TinyNet(hidden=hidden)


class RandomData(Dataset):
    """Random features and labels drawn from the global torch generator: what is built after the seed matters."""

    def __init__(self, samples: int = 32, features: int = 6, classes: int = 3) -> None:
        self.x = torch.randn(samples, features)
        self.y = torch.randint(0, classes, (samples,))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class TinyTrainer(Trainer):
    """A classifier Trainer with a setting of its own.

    Args:
        lr: AdamW's learning rate.
    """

    def __init__(self, *args, lr: float = 0.01, **kwargs) -> None:
        self.lr = lr  # before Trainer.__init__, which calls configure_optimizers
        super().__init__(*args, **kwargs)

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch):
        x, y = batch
        return {"val_loss": F.cross_entropy(self.model(x), y)}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


def unannotated_net(hidden: int = 16):
    """A model function without a return annotation: a config cannot tell that it makes a module."""
    return TinyNet(hidden=hidden)


def hf_rows(samples: int = 8) -> datasets.Dataset:
    """A Hugging Face dataset of feature rows and labels."""
    return datasets.Dataset.from_dict({"x": torch.randn(samples, 6).tolist(), "labels": [0] * samples})
