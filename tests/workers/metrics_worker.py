"""Validates a fixed model with the Metrics callback and writes what it computed (rank 0) as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from checks import leave  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from trainer_setup import ClassifierTrainer  # noqa: E402

from callbacks import Metrics  # noqa: E402


class ClassifierWithPredictions(ClassifierTrainer):
    def validation_step(self, batch):
        x, y = batch
        logits = self.model(x)
        return {"val_loss": F.cross_entropy(logits, y), "predictions": logits.argmax(-1), "references": y}


def evaluation_set() -> TensorDataset:
    """37 samples: with batch 4 on two processes the last round is uneven and padded."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(37, 6, generator=generator)
    y = torch.randint(0, 3, (37,), generator=generator)
    return TensorDataset(x, y)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    metrics = Metrics({"accuracy": {}, "f1": {"average": "macro"}})
    trainer = ClassifierWithPredictions(model(), eval_data=evaluation_set(), batch_size=4, output_dir=args.output_dir,
                                        callbacks=[metrics], trackers=[], progress_bar=False, checkpoint=False)
    results = trainer.validate()
    if trainer.is_main_process:
        args.result.write_text(json.dumps({k: v for k, v in results.items() if k != "val_loss"}))
    trainer.accelerator.end_training()
    leave()


if __name__ == "__main__":
    main()
