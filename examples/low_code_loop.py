"""The low-code loop: a plain PyTorch training loop made device-agnostic by a few added lines.

The loop below is the one from the Accelerate talk with only its import line changed
(``from accelerate import Accelerator`` -> ``from trainer import Accelerator``). The talk
leaves the model and the dataset abstract; here they are a small classifier and a dataset
of labelled points that ``load_dataset`` reads from a local folder (nothing is downloaded).

    python examples/low_code_loop.py --epochs 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import load_dataset

from trainer import Accelerator  # the only line that differs from the talk


def write_my_dataset(folder: Path, samples: int = 512, seed: int = 0) -> Path:
    """A local dataset folder: two features, three classes arranged in three clusters."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = torch.randint(0, 3, (samples,), generator=generator)
    points = centres[labels] + 0.6 * torch.randn(samples, 2, generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as file:
        for point, label in zip(points.tolist(), labels.tolist()):
            file.write(json.dumps({"source": point, "targets": label}) + "\n")
    return folder


def to_pairs(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate dataset rows into (source, targets), the shape the talk's loop unpacks."""
    return torch.stack([row["source"] for row in rows]), torch.stack([row["targets"] for row in rows])


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def train(data_dir: Path, epochs: int = 10, batch_size: int = 16) -> tuple[Accelerator, torch.nn.Module, list[float]]:
    """The talk's loop. Returns the accelerator, the trained model and the loss of each epoch."""
    accelerator = Accelerator()
    device = accelerator.device

    model = make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    dataset = load_dataset(str(data_dir), split="train").with_format("torch")
    dataloader = torch.utils.data.DataLoader(dataset, shuffle=True, batch_size=batch_size, collate_fn=to_pairs)

    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)

    model.train()
    epoch_losses = []
    for _epoch in range(epochs):
        total, batches = 0.0, 0
        for source, targets in dataloader:
            optimizer.zero_grad()
            output = model(source)
            loss = F.cross_entropy(output, targets)
            accelerator.backward(loss)
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        epoch_losses.append(total / batches)
    return accelerator, model, epoch_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=None, help="where to write the local dataset")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp()) / "my_dataset"
    write_my_dataset(data_dir)
    accelerator, _model, losses = train(data_dir, epochs=args.epochs)
    accelerator.print(f"device={accelerator.device} first-epoch loss={losses[0]:.4f} last-epoch loss={losses[-1]:.4f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
