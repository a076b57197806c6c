"""The demo behind ``make demo``: train with the Trainer on the CPU, stop, resume, evaluate.

It trains a digit classifier (scikit-learn's bundled digits, so nothing is downloaded) with a
progress bar, gradient accumulation, checkpoints, early stopping and LR logging, recorded in a
CSV file and an MLflow sqlite store (no server); stops part-way as an interrupted job would;
starts a new Trainer that resumes from the latest checkpoint (and the same MLflow run); and
reports the accuracy on held-out digits, checks the weights against an uninterrupted run, reads
the run back from the MLflow store, and says where everything was written. Last, large-model
inference with offload: the trained classifier predicts with half its layers on disk
(``trainer.predict(device_map=...)``), and a GPT-2 saved as a sharded checkpoint is loaded into
an empty model under a 16 MB CPU budget, most of it left on disk, and generates text.

    python examples/demo.py --output-dir outputs/demo
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import big_model_inference  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from trainer_digits import TARGET_ACCURACY, accuracy, digits, train  # noqa: E402

from callbacks import MLflowTracker  # noqa: E402
from trainer import PartialState  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--stop-after", type=int, default=8, help="epochs of the first, interrupted run")
    args = parser.parse_args()
    out = args.output_dir.resolve()
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time

    first = train(out, epochs=args.stop_after, resume=None)
    first.accelerator.print(f"stopped after epoch {first.current_epoch - 1} (step {first.global_step}), "
                            f"as an interrupted job would")

    PartialState._reset_state()  # a new process would start here
    trainer = train(out, epochs=args.epochs, resume="latest")
    acc = accuracy(trainer)
    latest = (trainer.checkpoint_dir / "latest").read_text().strip()
    trainer.accelerator.print(f"resumed and finished at step {trainer.global_step}: held-out accuracy {acc:.4f} "
                              f"(target {TARGET_ACCURACY})")
    PartialState._reset_state()
    straight = train(out / "uninterrupted", epochs=args.epochs, resume=None, quiet=True)
    same = all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(), trainer.model.state_dict().values()))
    trainer.accelerator.print(f"weights bit-identical to an uninterrupted run of the same length: {same}")
    trainer.accelerator.print("outputs:")
    trainer.accelerator.print(f"  checkpoints: {trainer.checkpoint_dir} (latest: {latest})")
    for path in sorted(p for p in trainer.checkpoint_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        trainer.accelerator.print(f"    {path.name}: {', '.join(sorted(f.name for f in path.iterdir()))}")
    trainer.accelerator.print(f"  metrics (CSV): {out / 'csv' / 'metrics.csv'}")
    for tracker in trainer.callbacks.find(MLflowTracker):
        report_mlflow(tracker, out)

    # Large-model inference with offload.
    _, test_set = digits()
    inputs = TensorDataset(test_set.tensors[0])
    offloaded = torch.cat(trainer.predict(inputs, device_map={"0": "disk", "1": "cpu", "2": "cpu", "3": "disk"},
                                          offload_folder=out / "offload"))
    in_memory = torch.cat(trainer.predict(inputs))
    print(f"offloaded prediction (layers 0 and 3 on disk): held-out accuracy "
          f"{(offloaded == test_set.tensors[1]).float().mean().item():.4f}, equal to in memory: "
          f"{torch.equal(offloaded, in_memory)}")
    print(big_model_inference.report(big_model_inference.run(out / "big_model")))


def report_mlflow(tracker: MLflowTracker, out: Path) -> None:
    """Read the run back from the MLflow store, as ``mlflow ui`` would show it."""
    from mlflow import MlflowClient

    uri = tracker.resolve_uri(out)
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    accuracy = client.get_metric_history(run.info.run_id, "val_acc")
    best = max(accuracy, key=lambda metric: metric.value)
    print(f"  MLflow: {uri} (run {run.info.run_id}, {run.info.status}): {len(accuracy)} validations, "
          f"best val_acc {best.value:.4f} at step {best.step}; {len(run.data.params)} parameters")
    print(f"    browse it with: mlflow ui --backend-store-uri {uri}")


if __name__ == "__main__":
    main()
