"""An Accelerate-style loop whose linear schedule is sized from the unprepared loader (see test_scheduler_semantics.py).

As every upstream example does: ``num_training_steps = len(train_dataloader) * num_epochs`` before
``prepare``. Prints the learning rate after the last step on each process.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainer import Accelerator


def main(accumulation: int) -> None:
    accelerator = Accelerator(gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_dataloader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8, shuffle=True)
    num_epochs = 2
    num_training_steps = len(train_dataloader) * num_epochs // accumulation
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / num_training_steps))
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    for _ in range(num_epochs):
        for x, y in train_dataloader:
            with accelerator.accumulate(model):
                accelerator.backward(F.mse_loss(model(x), y))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
    sys.stdout.write(f"LR rank {accelerator.process_index}: {scheduler.get_last_lr()[0]:.6f} after {num_training_steps} "
                     "scheduled steps\n")  # one write: the ranks share the pipe
    sys.stdout.flush()
    accelerator.end_training()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
