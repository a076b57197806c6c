"""The tracker layer: the embedded default, the CSV file, the low-code API, failure isolation, registration."""

from __future__ import annotations

import csv
import importlib.util
import json
import warnings

import pytest
import torch
from tracker_helpers import csv_history
from trainer_setup import make_trainer

from callbacks import CSVTracker, Tracker, register_tracker
from callbacks.trackers import TRACKERS, TrackerPackageMissing, default_trackers, make_tracker
from trainer import Accelerator, PartialState


def test_csv_records_every_logged_value_at_its_step(tmp_path):
    trainer = make_trainer(tmp_path, trackers=["csv"], log_every_n_steps=2, hparams={"note": "first"})
    trainer.fit()
    history = csv_history(tmp_path)
    # 3 epochs x 9 batches with accumulation 2: 5 optimizer steps an epoch, 15 in all.
    assert [step for step, _ in history["train_loss"]] == [2, 4, 6, 8, 10, 12, 14]
    assert [step for step, _ in history["val_loss"]] == [3, 5, 6, 9, 10, 12, 15]
    assert history["val_loss"][-1][1] == trainer.metrics["val_loss"]
    assert history["train_loss"][-1][1] == trainer.metrics["train_loss"]
    config = json.loads((tmp_path / "csv" / "config.json").read_text())
    assert config["batch_size"] == 4 and config["accumulate"] == 2 and config["note"] == "first"


def test_no_tracker_named_records_csv_and_a_local_mlflow_store(tmp_path, monkeypatch):
    monkeypatch.delenv("TRAINER_TRACKERS")
    expected = ["csv", "mlflow"] if importlib.util.find_spec("mlflow") else ["csv"]
    assert default_trackers() == expected
    trainer = make_trainer(tmp_path, max_epochs=1)
    assert [cb.name for cb in trainer.callbacks.callbacks if isinstance(cb, Tracker)] == expected
    trainer.fit()
    assert (tmp_path / "csv" / "metrics.csv").exists()
    if "mlflow" in expected:
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run = client.search_runs([client.get_experiment_by_name("trainer").experiment_id])[0]
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [(m.step, m.value) for m in history] == csv_history(tmp_path)["val_loss"]


def test_trackers_empty_records_nothing(tmp_path):
    trainer = make_trainer(tmp_path, trackers=[], max_epochs=1)
    trainer.fit()
    assert not (tmp_path / "csv").exists()


def test_environment_chooses_the_default(monkeypatch):
    monkeypatch.setenv("TRAINER_TRACKERS", "none")
    assert default_trackers() == []
    monkeypatch.setenv("TRAINER_TRACKERS", "csv, tensorboard")
    assert default_trackers() == ["csv", "tensorboard"]


def test_resumed_fit_appends_to_the_same_csv(tmp_path):
    make_trainer(tmp_path, trackers=["csv"], max_epochs=1, log_every_n_steps=1).fit()
    PartialState._reset_state()
    make_trainer(tmp_path, trackers=["csv"], max_epochs=2, log_every_n_steps=1).fit(resume="latest")
    steps = [step for step, _ in csv_history(tmp_path)["train_loss"]]
    assert steps == list(range(1, 11))


def test_low_code_trackers(tmp_path):
    accelerator = Accelerator(log_with=["csv"], project_dir=tmp_path)
    accelerator.init_trackers("low-code", config={"lr": 0.1, "layers": [2, 3]})
    for step in range(3):
        accelerator.log({"loss": torch.tensor(1.0 / (step + 1)), "lr": 0.1}, step=step)
    tracker = accelerator.get_tracker("csv")
    assert tracker.tracker == tmp_path / "csv" / "metrics.csv"
    assert accelerator.get_tracker("csv", unwrap=True) == tracker.tracker
    accelerator.end_training()
    with (tmp_path / "csv" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(int(r["step"]), float(r["loss"])) for r in rows] == [(0, 1.0), (1, 0.5), (2, torch.tensor(1.0 / 3).item())]
    assert json.loads((tmp_path / "csv" / "config.json").read_text())["layers"] == [2, 3]
    with pytest.raises(ValueError, match="No tracker named 'wandb'"):
        accelerator.get_tracker("wandb")


class Flaky(Tracker):
    """A backend that accepts the start and then fails on its third log call."""

    name = "flaky"

    def _start(self, project_name, config, logging_dir, **kwargs):
        self.calls = []
        return self.calls

    def _log(self, values, step, **kwargs):
        if len(self.calls) == 2:
            raise ConnectionError("backend went away")
        self.calls.append((step, values))


@pytest.mark.parametrize("background", [False, True], ids=["in-line", "own-thread"])
def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, background):
    flaky = Flaky()
    flaky.background = background
    trainer = make_trainer(tmp_path, trackers=["csv", flaky], log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    ours = [w for w in caught if "tracker" in str(w.message)]
    assert len(ours) == 1
    assert "'flaky' tracker could not log (ConnectionError: backend went away)" in str(ours[0].message)
    assert flaky.failed and trainer.global_step == 15
    assert len(csv_history(tmp_path)["train_loss"]) == 15  # the other tracker kept recording


@pytest.mark.parametrize("background", [False, True], ids=["in-line", "own-thread"])
def test_a_failing_tracker_can_stop_training(tmp_path, background):
    flaky = Flaky(on_error="raise")
    flaky.background = background
    trainer = make_trainer(tmp_path, trackers=[flaky], log_every_n_steps=1)
    with pytest.raises(ConnectionError, match="backend went away"):
        trainer.fit()
    assert trainer.global_step < 15


def test_user_trackers_register_by_name(tmp_path):
    register_tracker(Flaky)
    try:
        assert isinstance(make_tracker("flaky"), Flaky)
        accelerator = Accelerator(log_with="flaky")
        accelerator.init_trackers("p")
        accelerator.log({"a": 1}, step=0)
        assert accelerator.get_tracker("flaky", unwrap=True) == [(0, {"a": 1})]
    finally:
        TRACKERS.pop("flaky")


def test_missing_package_is_one_error_at_construction(monkeypatch, tmp_path):
    class NeedsMissing(Tracker):
        name, requires, extra = "needs-missing", "package_that_is_not_installed", "needs-missing"

    with pytest.raises(TrackerPackageMissing, match=r"pip install 'trainer-kit\[needs-missing\]'"):
        make_trainer(tmp_path, trackers=[NeedsMissing])
    assert not (tmp_path / "checkpoints").exists()


def test_only_the_main_process_records(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")  # read when no process group exists
    tracker = CSVTracker(logging_dir=tmp_path)
    assert not tracker.active and not tracker.handles("on_fit_start")
    tracker.start("p", {"a": 1})
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert not (tmp_path / "csv").exists()
    everywhere = CSVTracker(logging_dir=tmp_path, main_process_only=False)
    everywhere.start("p")
    everywhere.log({"loss": 1.0}, step=1)
    assert (tmp_path / "csv" / "metrics.csv").exists()


def test_tables_and_artifacts_in_csv(tmp_path):
    tracker = CSVTracker(logging_dir=tmp_path)
    tracker.start("p")
    tracker.log_table("preds", columns=["x", "y"], data=[[1, 2], [3, 4]], step=5)
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt")
    with pytest.raises(NotImplementedError, match="does not record images"):
        tracker.log_images({"img": torch.zeros(3, 4, 4)}, step=1)
    tracker.finish()
    assert (tmp_path / "csv" / "preds_step5.csv").read_text().splitlines() == ["x,y", "1,2", "3,4"]
    assert (tmp_path / "csv" / "artifacts" / "notes.txt").read_text() == "hello"
