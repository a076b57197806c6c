"""The ClearML tracker: a real fit in ClearML's offline mode, read back from the session ClearML wrote.

ClearML has no reader for offline sessions apart from ``Task.import_offline_session``, which uploads
to a server; these tests read the same files it would upload (the session zip: ``task.json`` and the
JSON-lines ``metrics.jsonl``) and compare them with what the Trainer logged.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pytest
from tracker_helpers import csv_history
from trainer_setup import make_trainer

from callbacks.trackers import ClearMLTracker, CSVTracker
from callbacks.trackers.clearml_tracker import credentials_configured, title_and_series

pytest.importorskip("clearml")
from clearml import Task  # noqa: E402
from PIL import Image  # noqa: E402  (a ClearML dependency)

# ClearML's bundled config parser calls pyparsing's deprecated names
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:clearml.*"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:pyparsing.*")]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No credentials and no clearml.conf: the tracker must choose offline mode. ClearML's files stay in tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "home" / "clearml.conf"))  # absent
    for name in ("CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY", "TRAINS_API_ACCESS_KEY", "CLEARML_API_HOST",
                 "CLEARML_OFFLINE_MODE"):  # Task.set_offline writes CLEARML_OFFLINE_MODE: removed again afterwards
        monkeypatch.delenv(name, raising=False)
    threads, children = set(threading.enumerate()), set(psutil.Process().children(recursive=True))
    yield
    assert set(threading.enumerate()) <= threads
    assert set(psutil.Process().children(recursive=True)) <= children


class OfflineSession:
    """The zipped offline session ClearML writes when the Task closes."""

    def __init__(self, folder: Path) -> None:
        with zipfile.ZipFile(f"{folder}.zip") as archive:
            self.files = {name: archive.read(name) for name in archive.namelist()}
        self.task = json.loads(self.files["task.json"])
        self.events = [event for line in self.files["metrics.jsonl"].decode().splitlines() if line.strip()
                       for event in json.loads(line)]

    def of_type(self, kind: str) -> list[dict]:
        return [event for event in self.events if event["type"] == kind]

    def file(self, url: str) -> bytes:
        """A file the session refers to by its local path (images, artifacts): stored under ``data/`` in the zip."""
        return self.files["data/" + url.split("/data/", 1)[1]]


def test_fit_scalars_and_config_read_back(tmp_path):
    tracker = ClearMLTracker(on_error="raise")
    trainer = make_trainer(tmp_path, trackers=[CSVTracker(), tracker], log_every_n_steps=2, project="clearml-test",
                           run_name="fit-run")
    trainer.fit()
    assert not tracker.failed and tracker.run_id.startswith("offline-")
    assert tracker.offline_folder.is_relative_to(tmp_path / "clearml-cache")

    session = OfflineSession(tracker.offline_folder)
    logged = defaultdict(list)
    for event in session.of_type("training_stats_scalar"):
        assert event["task"] == tracker.run_id
        name = event["metric"] if event["metric"] == event["variant"] else f"{event['metric']}/{event['variant']}"
        logged[name].append((event["iter"], event["value"]))
    expected = csv_history(tmp_path)
    assert [step for step, _ in expected["train_loss"]] == [2, 4, 6, 8, 10, 12, 14]
    assert dict(logged) == expected  # same steps, same values, same order

    assert session.task["name"] == "fit-run" and session.task["project_name"] == "clearml-test"
    config = {name: entry["value"] for name, entry in session.task["hyperparams"]["config"].items()}
    assert config["batch_size"] == "4" and config["max_epochs"] == "3" and config["accumulate"] == "2"


def test_images_tables_artifacts_and_a_second_task(tmp_path):
    first = ClearMLTracker(on_error="raise")
    first.start("proj", {"lr": 0.1, "model": {"width": 16}}, tmp_path)
    flat = np.full((8, 10, 3), (200, 40, 90), dtype=np.uint8)  # one colour: JPEG keeps it almost exactly
    first.log_images({"samples/flat": flat, "chw": np.ones((3, 6, 5), dtype=np.float32),
                      "rgba": np.zeros((6, 5, 4), dtype=np.uint8)}, step=3)
    first.log_table("predictions", columns=["id", "label"], data=[[1, "cat"], [2, "dog"]], step=3)
    first.log({"val/loss": 0.25, "note": "not a number"}, step=3)
    first.log({"final_acc": 0.75})
    (tmp_path / "weights.txt").write_text("w")
    first.log_artifact(tmp_path / "weights.txt", name="weights")
    first.finish()

    session = OfflineSession(first.offline_folder)
    assert session.task["hyperparams"]["config"]["model/width"]["value"] == "16"
    images = {(e["metric"], e["variant"]): e for e in session.of_type("training_debug_image")}
    assert set(images) == {("samples", "flat"), ("chw", "chw"), ("rgba", "rgba")} and images["samples", "flat"]["iter"] == 3
    decoded = np.asarray(Image.open(io.BytesIO(session.file(images["samples", "flat"]["url"]))))
    assert decoded.shape == flat.shape and np.abs(decoded.astype(int) - flat).max() <= 3
    assert np.asarray(Image.open(io.BytesIO(session.file(images["chw", "chw"]["url"])))).shape == (6, 5, 3)
    assert np.asarray(Image.open(io.BytesIO(session.file(images["rgba", "rgba"]["url"])))).shape == (6, 5, 3)

    (table,) = session.of_type("plot")
    plot = json.loads(table["plot_str"])["data"][0]
    assert (table["metric"], table["iter"]) == ("predictions", 3)
    assert plot["header"]["values"] == ["id", "label"] and plot["cells"]["values"] == [[1, 2], ["cat", "dog"]]

    scalars = {(e["metric"], e["variant"]): e for e in session.of_type("training_stats_scalar")}
    assert scalars["val", "loss"]["value"] == 0.25 and scalars["val", "loss"]["iter"] == 3
    assert scalars["Summary", "final_acc"]["value"] == 0.75  # logged without a step: ClearML's single value
    assert not [key for key in scalars if "note" in key]

    (artifact,) = session.task["execution"]["artifacts"]
    assert artifact["key"] == "weights" and session.file(artifact["uri"]) == b"w"

    # ClearML keeps one Task per process: a second start, after the first finished, opens a new one.
    second = ClearMLTracker(on_error="raise", run_name="again")
    second.start("proj", {"lr": 0.2}, tmp_path)
    second.log({"loss": 1.5}, step=1)
    second.finish("failed")
    assert second.run_id != first.run_id
    assert Task.current_task() is None  # closed: the next start opens a new Task again
    assert "_report_subprocess_enabled" not in vars(Task)  # ClearML's own setting back in force
    again = OfflineSession(second.offline_folder)
    assert again.task["name"] == "again"
    assert [(e["iter"], e["value"]) for e in again.of_type("training_stats_scalar")] == [(1, 1.5)]


def test_offline_unless_credentials(tmp_path, monkeypatch):
    assert not credentials_configured()
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "key")
    assert credentials_configured()
    monkeypatch.delenv("CLEARML_API_ACCESS_KEY")
    config = tmp_path / "home" / "clearml.conf"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("api { }\n")
    assert credentials_configured()


def test_title_and_series():
    assert title_and_series("val/loss") == ("val", "loss")
    assert title_and_series("train/lr/group0") == ("train/lr", "group0")
    assert title_and_series("train_loss") == ("train_loss", "train_loss")
    assert title_and_series("odd/") == ("odd/", "odd/")
