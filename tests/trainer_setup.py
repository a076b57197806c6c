"""A small, fully seeded Trainer run shared by the Trainer tests and their subprocess workers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from trainer import Trainer

SAMPLES, BATCH = 36, 4  # 9 batches per epoch: with accumulation 2 the last group of an epoch is short


class ClassifierTrainer(Trainer):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch):
        x, y = batch
        logits = self.model(x)
        return {"val_loss": F.cross_entropy(logits, y), "val_acc": (logits.argmax(-1) == y).float().mean()}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.1 * step))


def model(init_seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(init_seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))


def datasets():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES + 10, 6, generator=generator)
    y = torch.randint(0, 3, (SAMPLES + 10,), generator=generator)
    return TensorDataset(x[:SAMPLES], y[:SAMPLES]), TensorDataset(x[SAMPLES:], y[SAMPLES:])


def make_trainer(output_dir, init_seed: int = 0, callbacks=(), **overrides) -> ClassifierTrainer:
    train, evaluation = datasets()
    settings = dict(train_data=train, eval_data=evaluation, batch_size=BATCH, max_epochs=3, accumulate=2,
                    grad_clip=1.0, eval_every_n_steps=3, output_dir=output_dir, seed=7, callbacks=list(callbacks),
                    progress_bar=False)
    settings.update(overrides)
    return ClassifierTrainer(model(init_seed), **settings)
