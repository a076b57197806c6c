"""The Metrics callback: evaluate metrics from the project's own offline scripts, equal on 1 and 2 processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_distributed

pytest.importorskip("evaluate")
from callbacks import EarlyStopping, Metrics, load_metric  # noqa: E402
from callbacks.metric_scripts import NAMES  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "metrics_worker.py"
sys.path.insert(0, str(WORKER.parent))


def test_bundled_scripts_load_offline_and_compute(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert set(NAMES) >= {"accuracy", "f1", "mse"}
    assert load_metric("accuracy").compute(predictions=[1, 0, 2, 2], references=[1, 1, 2, 0]) == {"accuracy": 0.5}
    # f1 of class 1: precision 2/3, recall 1 -> 0.8
    assert load_metric("f1").compute(predictions=[1, 1, 1, 0], references=[1, 1, 0, 0]) == {"f1": 0.8}
    macro = load_metric("f1").compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2], average="macro")
    assert macro["f1"] == pytest.approx((1.0 + 2 / 3 + 2 / 3) / 3)
    assert load_metric("mse").compute(predictions=[1.0, 3.0], references=[0.0, 1.0]) == {"mse": 2.5}


def expected_results() -> dict[str, float]:
    """The metrics computed directly over the whole evaluation set, in one piece."""
    from metrics_worker import evaluation_set, model

    x, y = evaluation_set().tensors
    with torch.no_grad():
        predictions = model()(x).argmax(-1).tolist()
    accuracy = load_metric("accuracy").compute(predictions=predictions, references=y.tolist())["accuracy"]
    f1 = load_metric("f1").compute(predictions=predictions, references=y.tolist(), average="macro")["f1"]
    return {"val_accuracy": accuracy, "val_f1": f1}


def test_two_processes_give_the_single_process_values(tmp_path):
    results = {}
    for nproc in (1, 2):
        path = tmp_path / f"results_{nproc}.json"
        run_distributed(WORKER, nproc=nproc, args=["--output-dir", tmp_path / str(nproc), "--result", path])
        results[nproc] = json.loads(path.read_text())
    assert results[1] == results[2] == expected_results()


def test_metrics_are_logged_and_watched_by_other_callbacks(tmp_path):
    from metrics_worker import ClassifierWithPredictions, model
    from tracker_helpers import csv_history
    from trainer_setup import datasets

    train, evaluation = datasets()
    # Listed before Metrics on purpose: the bus runs metric callbacks first, so the stopper sees val_accuracy.
    stopper = EarlyStopping("val_accuracy", mode="max", patience=100)
    trainer = ClassifierWithPredictions(model(), train_data=train, eval_data=evaluation, batch_size=4, max_epochs=2,
                                        output_dir=tmp_path, callbacks=[stopper, Metrics("accuracy")], trackers=["csv"],
                                        progress_bar=False, checkpoint=False)
    trainer.fit()
    logged = csv_history(tmp_path)["val_accuracy"]
    assert [step for step, _ in logged] == [9, 18]
    assert logged[-1][1] == trainer.metrics["val_accuracy"]
    assert stopper.best == max(value for _, value in logged)


def test_a_validation_step_without_predictions_explains_what_to_return(tmp_path):
    from trainer_setup import make_trainer

    trainer = make_trainer(tmp_path, callbacks=[Metrics("accuracy")], trackers=[])
    with pytest.raises(KeyError, match="return them from validation_step"):
        trainer.validate()
