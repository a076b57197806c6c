"""The Comet tracker, offline: what a real fit logged is read back from the experiment's offline archive.

The archive's messages are checked against Comet's own JSON schemas (the ones ``comet upload``
validates with) and rebuilt with Comet's own message classes, so the test checks what an upload
would send. Comet's configuration file, home and server URL point into ``tmp_path`` or at a
closed local port: nothing of the user's is read or written, and nothing can reach a server.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tracker_helpers import csv_history
from trainer_setup import make_trainer

from callbacks.trackers.comet_tracker import CometMLTracker
from callbacks.trackers.csv_tracker import CSVTracker
from callbacks.trackers.images import to_hwc_uint8

# comet_ml is imported by the tracker, not here: its first import decides whether it reports errors over the network
pytestmark = pytest.mark.skipif(importlib.util.find_spec("comet_ml") is None, reason="comet_ml is not installed")
TRAINER_METRICS = {"train_loss", "val_loss", "val_acc"}


@pytest.fixture(autouse=True)
def isolated_comet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No API key, no user configuration file, no reachable server."""
    for name in [name for name in os.environ if name.startswith("COMET_")]:
        monkeypatch.delenv(name)
    state = tmp_path / "comet_state"
    monkeypatch.setenv("HOME", str(state / "home"))
    monkeypatch.setenv("COMET_CONFIG", str(state / "comet.config"))
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(state / "not_used"))  # the tracker's directory must win
    monkeypatch.setenv("COMET_URL_OVERRIDE", "http://127.0.0.1:9/clientlib/")
    return state


class Archive:
    """One offline archive, its messages validated and rebuilt as ``comet upload`` does."""

    def __init__(self, path: Path) -> None:
        from comet_ml.messages import LogOtherMessage, MetricMessage, ParameterMessage, UploadFileMessage
        from comet_ml.schemas import (
            get_experiment_file_validator,
            get_log_other_msg_validator,
            get_metric_msg_validator,
            get_parameter_msg_validator,
            get_upload_msg_validator,
        )

        with zipfile.ZipFile(path) as archive:
            self.experiment = json.loads(archive.read("experiment.json"))
            lines = archive.read("messages.json").decode().splitlines()
            self.files = {name: archive.read(name) for name in archive.namelist()}
        get_experiment_file_validator().validate(self.experiment)
        self.messages = [json.loads(line) for line in lines if line.strip()]
        validators = {MetricMessage.type: get_metric_msg_validator(), ParameterMessage.type: get_parameter_msg_validator(),
                      UploadFileMessage.type: get_upload_msg_validator(), LogOtherMessage.type: get_log_other_msg_validator()}
        for message in self.messages:
            if message["type"] in validators:
                validators[message["type"]].validate(message["payload"])

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [message["payload"] for message in self.messages if message["type"] == kind]

    def metrics(self, names: set[str] = TRAINER_METRICS) -> list[tuple[int, str, float]]:
        from comet_ml.messages import MetricMessage

        rebuilt = [MetricMessage.from_message_dict(payload).metric for payload in self.of_type(MetricMessage.type)]
        return sorted((m["step"], m["metricName"], m["metricValue"]) for m in rebuilt if m["metricName"] in names)

    def parameters(self) -> dict[str, Any]:
        """The parameters the tracker logged (Comet's own, such as ``curr_step``, left out)."""
        from comet_ml.messages import ParameterMessage

        rebuilt = [ParameterMessage.from_message_dict(payload) for payload in self.of_type(ParameterMessage.type)]
        return {p.param["paramName"]: p.param["paramValue"] for p in rebuilt if p.get_source() == "manual"}

    def others(self) -> dict[str, Any]:
        return {payload["key"]: payload["value"] for payload in self.of_type("log_other")}

    def upload(self, file_name: str) -> tuple[dict[str, Any], bytes]:
        """An uploaded file's parameters and content, by the name it is shown under (images: their ``figName``)."""
        payload = next(p for p in self.of_type("file_upload")
                       if file_name in (p["additional_params"].get("fileName"), p["additional_params"].get("figName")))
        return payload["additional_params"], self.files[payload["file_path"]]


def archives(directory: Path) -> list[Archive]:
    paths = sorted((directory / "comet").glob("*.zip"), key=lambda path: path.stat().st_mtime)
    return [Archive(path) for path in paths]


def csv_rows(directory: Path) -> list[tuple[int, str, float]]:
    """The CSV tracker's record of the same run, as ``Archive.metrics`` lists it."""
    return sorted((step, name, value) for name, pairs in csv_history(directory).items() for step, value in pairs)


def test_fit_logs_what_the_trainer_logged(tmp_path: Path) -> None:
    tracker = CometMLTracker()
    trainer = make_trainer(tmp_path, trackers=[CSVTracker(), tracker], log_every_n_steps=2, run_name="tiny")
    trainer.fit()
    assert not tracker.failed

    [archive] = archives(tmp_path)
    expected = csv_rows(tmp_path)
    assert {name for _, name, _ in expected} == TRAINER_METRICS
    assert archive.metrics() == expected  # every value once, at its step
    parameters = archive.parameters()
    assert parameters["batch_size"] == 4 and parameters["max_epochs"] == 3 and parameters["accumulate"] == 2
    assert archive.experiment["offline_id"] == tracker.run_id
    assert archive.experiment["project_name"] == "trainer" and archive.others()["Name"] == "tiny"
    assert not (tmp_path / "comet_state" / "not_used").exists()


def test_images_table_asset_nested_config_and_failed_status(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((3, 6, 5)).astype(np.float32)  # CxHxW floats in [0, 1]
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x01\x02\x03")

    tracker = CometMLTracker(online=False, log_code=False, log_git_metadata=False, log_git_patch=False,
                             log_env_details=False)
    tracker.start("proj", {"lr": 0.1, "model": {"width": 16, "act": "tanh"}}, tmp_path, tags=["baseline"])
    tracker.store_init_configuration({"lr": 0.2})
    tracker.log({"loss": 0.5, "phase": "warmup"}, step=1)
    tracker.log_images({"sample": image}, step=1)
    tracker.log_table("predictions", columns=["id", "label"], data=[[0, "cat"], [1, "dog"]], step=2)
    tracker.log_artifact(weights, name="model.bin")
    tracker.finish("failed")
    assert not tracker.failed

    [archive] = archives(tmp_path)
    assert archive.experiment["tags"] == ["baseline"]  # start's keywords, as Accelerator.init_trackers passes them
    assert archive.metrics({"loss"}) == [(1, "loss", 0.5)]
    parameters = archive.parameters()
    assert parameters["lr"] == 0.2 and parameters["model|width"] == 16 and parameters["model|act"] == "tanh"
    others = archive.others()
    assert others["phase"] == "warmup" and others["status"] == "failed"

    image_params, png = archive.upload("sample")
    assert image_params["step"] == 1 and image_params["imageId"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), to_hwc_uint8(image))

    table_params, table = archive.upload("predictions.csv")
    assert table_params["step"] == 2
    assert list(csv.reader(io.StringIO(table.decode()))) == [["id", "label"], ["0", "cat"], ["1", "dog"]]

    _, content = archive.upload("model.bin")
    assert content == b"\x01\x02\x03"


def test_resumed_fit_continues_the_same_experiment(tmp_path: Path) -> None:
    quick = {"log_code": False, "log_git_metadata": False, "log_git_patch": False, "log_env_details": False}
    first = CometMLTracker(**quick)
    make_trainer(tmp_path, trackers=[first], max_epochs=1, log_every_n_steps=2).fit()
    second = CometMLTracker(**quick)
    make_trainer(tmp_path, trackers=[second], max_epochs=2, log_every_n_steps=2).fit(resume="latest")

    assert second.run_id == first.run_id
    before, after = archives(tmp_path)
    assert before.experiment["offline_id"] == after.experiment["offline_id"] == first.run_id
    assert max(step for step, _, _ in before.metrics()) == 5 and min(step for step, _, _ in after.metrics()) > 5


def test_online_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CometMLTracker().resolve_online() is False
    monkeypatch.setenv("COMET_API_KEY", "x" * 20)
    assert CometMLTracker().resolve_online() is True
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    assert CometMLTracker().resolve_online() is False
    assert CometMLTracker(online=True).resolve_online() is True


def test_offline_start_keeps_comet_error_reports_off(tmp_path: Path) -> None:
    """In a fresh process, as a user's: comet_ml's import would set up Sentry error reports unless told not to."""
    script = f"""
import random
random.random = lambda: 0.9  # comet_ml enables its error reports for a random half of processes: pick that half
from callbacks.trackers.comet_tracker import CometMLTracker
tracker = CometMLTracker(log_code=False, log_git_metadata=False, log_git_patch=False, log_env_details=False)
tracker.start("proj", {{}}, {str(tmp_path)!r})
import comet_ml.error_tracking
print("error reports:", comet_ml.error_tracking.initialized())
tracker.finish()
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert "error reports: False" in done.stdout
