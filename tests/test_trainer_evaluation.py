"""Several named validation sets, test(), the best checkpoint and load_best_at_end."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file
from trainer_setup import datasets, make_trainer

from trainer.callbacks import Callback, EarlyStopping, ModelCheckpoint


def two_sets():
    train, evaluation = datasets()
    x, y = evaluation.tensors
    return {"a": torch.utils.data.TensorDataset(x[:6], y[:6]), "b": torch.utils.data.TensorDataset(x[6:], y[6:])}


def test_two_eval_sets_give_two_metric_families(tmp_path):
    stopper = EarlyStopping(monitor="val_loss/b", patience=1, min_delta=10.0)
    trainer = make_trainer(tmp_path, eval_data=two_sets(), max_epochs=10, callbacks=[stopper])
    trainer.fit()
    for family in ("val_loss/a", "val_acc/a", "val_loss/b", "val_acc/b"):
        assert family in trainer.metrics
    assert "val_loss" not in trainer.metrics
    assert trainer.should_stop and stopper.stopped_at_step == 5  # stopped on set b
    last_b = trainer.metrics["val_loss/b"]
    assert trainer.validate(two_sets()["b"])["val_loss"] == last_b  # the same set, alone, gives the same value


def test_test_uses_validation_step_and_names_test_metrics(tmp_path):
    events = []

    class Seen(Callback):
        def on_test_start(self, trainer):
            events.append("start")

        def on_test_batch_end(self, trainer, outputs, batch, batch_idx):
            events.append("batch")

        def on_test_end(self, trainer, metrics):
            events.append(sorted(metrics))

    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[Seen()])
    trainer.fit()
    metrics = trainer.test(datasets()[1])
    assert sorted(metrics) == ["test_acc", "test_loss"]
    assert events == ["start", "batch", "batch", "batch", ["test_acc", "test_loss"]]
    assert metrics["test_loss"] == trainer.validate(datasets()[1])["val_loss"]


def test_best_model_path_load_best_at_end_and_test_on_the_best(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_loss", mode="max", save_top_k=1)  # "best" is the worst loss: not the last
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[checkpoint], load_best_at_end=True)
    trainer.fit()
    best = checkpoint.best_model_path
    assert best.startswith(str(tmp_path / "checkpoints")) and best.endswith(checkpoint.best["name"])
    saved = load_file(str(tmp_path / "checkpoints" / checkpoint.best["name"] / "model.safetensors"))
    weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved.items())
    assert trainer.test(datasets()[1], ckpt="best")["test_loss"] == pytest.approx(checkpoint.best["score"])


def test_ckpt_best_without_a_monitored_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit()
    with pytest.raises(ValueError, match=r"ckpt='best' needs a ModelCheckpoint\(monitor=\.\.\.\).*none with a monitor"):
        trainer.test(datasets()[1], ckpt="best")
    assert trainer.test(datasets()[1], ckpt="last")["test_loss"] > 0


def test_test_metrics_reach_the_fit_runs_trackers(tmp_path):
    from mlflow import MlflowClient

    trainer = make_trainer(tmp_path, max_epochs=1, trackers=["csv", "mlflow"])
    trainer.fit()
    metrics = trainer.test(datasets()[1])
    with (tmp_path / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    tested = [row for row in rows if row.get("test_loss")]
    assert len(tested) == 1 and int(tested[0]["step"]) == trainer.global_step
    assert float(tested[0]["test_loss"]) == pytest.approx(metrics["test_loss"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("trainer").experiment_id])
    assert len(runs) == 1  # the fit's own run, reopened and finished again
    assert runs[0].data.metrics["test_loss"] == pytest.approx(metrics["test_loss"])
    assert runs[0].info.status == "FINISHED" and "val_loss" in runs[0].data.metrics  # logged during fit
