"""MLflow: a real ``mlflow server`` on 127.0.0.1, the local sqlite store, and a server that is not there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from distributed_helpers import free_port
from tracker_helpers import csv_history
from trainer_setup import make_trainer

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from callbacks import MLflowTracker  # noqa: E402


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` with a sqlite backend on a free port; stopped (with its workers) afterwards."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
               "--artifacts-destination", str(store / "artifacts")]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=store, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()) from None
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_a_run_through_a_real_server_is_read_back(tmp_path, mlflow_server):
    tracker = MLflowTracker(tracking_uri=mlflow_server, experiment_name="served")
    trainer = make_trainer(tmp_path, trackers=["csv", tracker], log_every_n_steps=2, run_name="first")
    trainer.fit()

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("served")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.info.run_id == tracker.run_id
    assert run.data.params["batch_size"] == "4" and run.data.params["max_epochs"] == "3"
    expected = csv_history(tmp_path)
    for name in ("train_loss", "val_loss", "val_acc"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(logged) == sorted(expected[name])


def test_images_tables_and_artifacts_through_the_server(tmp_path, mlflow_server):
    tracker = MLflowTracker(tracking_uri=mlflow_server)
    tracker.start("media", {"lr": 0.1})
    image = np.zeros((3, 8, 8), dtype=np.float32)
    image[0] = 1.0  # red
    tracker.log_images({"sample": image}, step=2)
    tracker.log_table("predictions", columns=["x", "y"], data=[[1, 2], [3, 4]])
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt", name="docs")
    tracker.finish()

    client = MlflowClient(mlflow_server)
    paths = {item.path for item in client.list_artifacts(tracker.run_id)}
    assert {"docs", "tables", "images"} <= paths
    notes = client.download_artifacts(tracker.run_id, "docs/notes.txt", str(tmp_path / "down"))
    assert Path(notes).read_text() == "hello"
    table = json.loads(Path(client.download_artifacts(tracker.run_id, "tables/predictions.json", str(tmp_path))).read_text())
    assert table["columns"] == ["x", "y"] and table["data"] == [[1, 2], [3, 4]]
    images = [item.path for item in client.list_artifacts(tracker.run_id, "images")]
    assert images and all("sample" in path for path in images)


def test_a_dead_server_costs_one_warning_and_training_finishes(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    trainer = make_trainer(tmp_path, trackers=["csv", MLflowTracker(tracking_uri=dead, health_timeout=2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    ours = [str(w.message) for w in caught if "tracker" in str(w.message)]
    assert len(ours) == 1 and "'mlflow' tracker could not start" in ours[0] and dead in ours[0]
    assert trainer.global_step == 15 and csv_history(tmp_path)["val_loss"]


def test_environment_variable_points_at_the_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    tracker = MLflowTracker()
    make_trainer(tmp_path, trackers=[tracker], max_epochs=1).fit()
    client = MlflowClient(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert not (tmp_path / "mlflow.db").exists()


def test_resumed_fit_continues_the_same_run(tmp_path):
    first = MLflowTracker()
    make_trainer(tmp_path, trackers=[first], max_epochs=1, log_every_n_steps=1).fit()
    from trainer import PartialState

    PartialState._reset_state()
    second = MLflowTracker()
    make_trainer(tmp_path, trackers=[second], max_epochs=2, log_every_n_steps=1).fit(resume="latest")
    assert second.run_id == first.run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(first.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 11))
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_a_run_stopped_by_a_signal_is_marked_killed(tmp_path):
    import signal

    from trainer.callbacks import Callback
    from trainer.graceful_stop import TrainingInterrupted

    class Preempt(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                signal.raise_signal(signal.SIGTERM)  # a real signal, to this process

    tracker = MLflowTracker()
    with pytest.raises(TrainingInterrupted) as stopped:
        make_trainer(tmp_path, trackers=[tracker], max_epochs=1, log_every_n_steps=1, callbacks=[Preempt()]).fit()
    assert stopped.value.code == 128 + signal.SIGTERM
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "epoch=0-step=2"


def test_on_its_own_thread_every_value_reads_back_and_new_stores_are_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = []
    for name in ("first", "second"):  # the first makes the empty store, the second copies it
        out = tmp_path / name
        trainer = make_trainer(out, trackers=["csv", MLflowTracker(send_every=0)], log_every_n_steps=1)
        tracker = trainer.callbacks.find(MLflowTracker)[0]
        assert tracker.background
        trainer.fit()
        client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
        run = client.search_runs([client.get_experiment_by_name("trainer").experiment_id])[0]
        assert run.info.status == "FINISHED"
        expected = csv_history(out)
        for key in ("train_loss", "val_loss"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert len(history) > 1 and history == sorted(expected[key]), key
        assert client.get_experiment("0").artifact_location == str(out / "mlruns" / "0")
        runs.append(run.info.run_id)
    assert runs[0] != runs[1]
    assert [p.name for p in (tmp_path / "cache" / "trainer" / "mlflow").iterdir()] == [
        f"empty-{__import__('mlflow').__version__}.db"]
