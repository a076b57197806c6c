"""The Trainer on real offline data: scikit-learn's bundled 8x8 handwritten digits.

A subclass supplies the training and validation steps; callbacks add checkpoints, early
stopping and learning-rate logging. Run it twice and the second run continues from the last
checkpoint (``fit(resume="latest")``). Reaches >= 95% accuracy on the held-out fifth of the data.

    python examples/trainer_digits.py --output-dir outputs/digits --epochs 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from trainer import Trainer, set_seed

TARGET_ACCURACY = 0.95


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """80/20 split of the 1,797 digits, pixels scaled to [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(128, 10))


class DigitsTrainer(Trainer):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch):
        x, y = batch
        logits = self.model(x)
        return {"val_loss": F.cross_entropy(logits, y), "val_acc": (logits.argmax(-1) == y).float().mean()}

    def predict_step(self, batch):
        (x,) = batch
        return self.model(x).argmax(-1)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=1e-4)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2000)


class EpochSummary(Callback):
    """One line per epoch on the main process (the progress bar is silent when output is not a terminal)."""

    def on_train_epoch_end(self, trainer):
        if trainer.is_main_process and not sys.stderr.isatty():
            metrics = trainer.metrics
            print(f"epoch {trainer.current_epoch}: step {trainer.global_step}, train_loss {metrics.get('train_loss', 0):.4f}, "
                  f"val_loss {metrics['val_loss']:.6f}, val_acc {metrics['val_acc']:.4f}", flush=True)


def train(output_dir: Path, epochs: int, resume: str | None = "latest", precision: str = "auto",
          quiet: bool = False) -> DigitsTrainer:
    train_set, test_set = digits()
    set_seed(0)  # before the model is built: its initial weights come from the seeded RNG
    trainer = DigitsTrainer(
        make_model(), train_data=train_set, eval_data=test_set, batch_size=32, max_epochs=epochs, accumulate=2,
        precision=precision, grad_clip=1.0, log_every_n_steps=5, output_dir=output_dir, seed=0,
        progress_bar=not quiet, trackers=[] if quiet else None,  # None: CSV, plus a local MLflow store if installed
        callbacks=[*([] if quiet else [EpochSummary()]), LearningRateMonitor(),
                   EarlyStopping("val_acc", mode="max", patience=8),
                   ModelCheckpoint(monitor="val_acc", mode="max", save_top_k=1, save_last=True)])
    trainer.fit(resume=resume)
    return trainer


def accuracy(trainer: DigitsTrainer) -> float:
    _, test_set = digits()
    predictions = torch.cat(trainer.predict(TensorDataset(test_set.tensors[0])))
    return (predictions == test_set.tensors[1]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/digits"))
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    trainer = train(args.output_dir, args.epochs)
    acc = accuracy(trainer)
    trainer.accelerator.print(f"test accuracy {acc:.4f} (target {TARGET_ACCURACY}) after {trainer.global_step} steps; "
                              f"checkpoints in {trainer.checkpoint_dir}")
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
