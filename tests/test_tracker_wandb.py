"""The wandb tracker, offline: what a real fit logged is read back from the run's own ``.wandb`` log.

The log is read with wandb's own reader (``wandb leet inspect --json``, which prints one JSON
object per record), so the test checks what ``wandb sync`` would upload, not what the tracker
meant to send. Every wandb directory points into ``tmp_path`` and the server URL at a closed
local port: nothing is read from or written to the user's home, and nothing can reach a server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tracker_helpers import csv_history
from trainer_setup import make_trainer

pytest.importorskip("wandb")

from callbacks.trackers.csv_tracker import CSVTracker  # noqa: E402
from callbacks.trackers.images import to_hwc_uint8  # noqa: E402
from callbacks.trackers.wandb_tracker import WandbTracker  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """wandb's settings, caches, staging and credentials all under tmp_path; no key, no mode, no server."""
    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    state = tmp_path / "wandb_state"
    monkeypatch.setenv("HOME", str(state / "home"))
    monkeypatch.setenv("NETRC", str(state / "netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(state / name.lower()))
    monkeypatch.setenv("WANDB_DIR", str(state / "not_used"))  # the tracker's dir= must win over it
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    return state


def read_log(log: Path) -> list[dict]:
    """The records of one ``.wandb`` log, as wandb's own reader prints them."""
    printed = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                             capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in printed.stdout.splitlines() if line.strip()]


def read_records(directory: Path) -> list[dict]:
    """The records of the single offline run under ``directory/wandb``."""
    logs = sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    return read_log(logs[0])


def history(records: list[dict]) -> dict[tuple[int, str], float]:
    """``{(step, name): value}`` for the user's values (wandb's own ``_step``, ``_runtime``... left out)."""
    rows = [record["history"] for record in records if record["type"] == "history"]
    return {(row["step"]["num"], name): value for row in rows for name, value in row["item"].items()
            if not name.startswith("_")}


def stored_config(records: list[dict]) -> dict:
    config: dict = {}
    for record in records:
        if record["type"] == "run":
            config.update(record["run"]["config"]["update"])
        elif record["type"] == "config":
            config.update(record["config"]["update"])
    return config


def csv_rows(directory: Path) -> dict[tuple[int, str], float]:
    """The CSV tracker's record of the same run, keyed as ``history`` is."""
    return {(step, name): value for name, pairs in csv_history(directory).items() for step, value in pairs}


HAVE_PROC = Path("/proc/self/cmdline").exists()


def wandb_services() -> list[list[str]]:
    """The command lines of wandb service processes started for this process (wandb-core gets ``--pid <our pid>``)."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            parts = path.read_bytes().decode().split("\0")
        except OSError:
            continue
        if parts[0].endswith("wandb-core") and str(os.getpid()) in parts:
            found.append(parts)
    return found


def test_fit_logs_what_the_trainer_logged(tmp_path: Path) -> None:
    tracker = WandbTracker()
    trainer = make_trainer(tmp_path, trackers=[CSVTracker(), tracker], log_every_n_steps=2, run_name="tiny")
    trainer.fit()

    records = read_records(tmp_path)
    expected = csv_rows(tmp_path)
    assert {name for _, name in expected} == {"train_loss", "val_loss", "val_acc"}
    assert history(records) == expected
    steps = [record["history"]["step"]["num"] for record in records if record["type"] == "history"]
    assert steps == sorted({step for step, _ in expected})  # one row per step, values of a step merged

    run = next(record["run"] for record in records if record["type"] == "run")
    assert run["run_id"] == tracker.run_id and run["project"] == "trainer" and run["display_name"] == "tiny"
    config = stored_config(records)
    assert config["batch_size"] == 4 and config["max_epochs"] == 3 and config["accumulate"] == 2
    assert next(record["exit"] for record in records if record["type"] == "exit").get("exit_code", 0) == 0
    assert not (tmp_path / "wandb_state" / "not_used").exists()
    assert wandb_services() == []


def test_images_table_artifact_and_failed_status(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((3, 6, 5)).astype(np.float32)  # CxHxW floats in [0, 1]
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x01\x02\x03")

    tracker = WandbTracker(mode="offline")
    tracker.start("proj", {"lr": 0.1, "model": {"width": 16}}, tmp_path, tags=["baseline"])
    if HAVE_PROC:
        [service] = wandb_services()  # the check at the end can see it, and offline it reports nothing anywhere
        assert "--no-observability" in service
    tracker.store_init_configuration({"lr": 0.2})
    tracker.log({"loss": 0.5}, step=1)
    tracker.log_images({"sample": image}, step=1)
    tracker.log_table("predictions", columns=["id", "label"], data=[[0, "cat"], [1, "dog"]], step=2)
    tracker.log_artifact(weights, name="model weights")
    tracker.finish("failed")
    assert not tracker.failed

    records = read_records(tmp_path)
    run = next(record["run"] for record in records if record["type"] == "run")
    assert run["tags"] == ["baseline"]  # start's keywords, as Accelerator.init_trackers passes them
    values = history(records)
    assert values[(1, "loss")] == 0.5
    assert values[(1, "sample._type")] == "image-file"
    files = next(tmp_path.glob("wandb/offline-run-*/files"))
    stored = np.asarray(Image.open(files / values[(1, "sample.path")]))
    assert np.array_equal(stored, to_hwc_uint8(image))

    assert values[(2, "predictions._type")] == "table-file"
    table = json.loads((files / values[(2, "predictions.path")]).read_text())
    assert table["columns"] == ["id", "label"] and table["data"] == [[0, "cat"], [1, "dog"]]

    artifacts = [record["artifact"] for record in records if record["type"] == "artifact"]
    weights_artifact = next(artifact for artifact in artifacts if artifact["name"] == "model-weights")
    assert weights_artifact["type"] == "file"
    assert [entry["path"] for entry in weights_artifact["manifest"]["contents"]] == ["weights.bin"]

    config = stored_config(records)
    assert config["lr"] == 0.2 and config["model"] == {"width": 16}
    assert next(record["exit"] for record in records if record["type"] == "exit")["exit_code"] == 1
    assert wandb_services() == []


def test_resumed_fit_continues_the_same_run(tmp_path: Path) -> None:
    first = WandbTracker()
    make_trainer(tmp_path, trackers=[first], max_epochs=1, log_every_n_steps=2).fit()
    second = WandbTracker()
    make_trainer(tmp_path, trackers=[second], max_epochs=2, log_every_n_steps=2).fit(resume="latest")

    assert second.run_id == first.run_id
    logs = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert [log.name for log in logs] == [f"run-{first.run_id}.wandb"] * 2  # both logs belong to the one run
    before, after = ({step for step, _ in history(read_log(log))} for log in logs)
    assert max(before) == 5 and min(after) > 5  # the resumed log takes up where the first stopped
    assert wandb_services() == []


def test_mode_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WandbTracker().resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbTracker().resolve_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbTracker().resolve_mode() == "disabled"
    assert WandbTracker(mode="offline").resolve_mode() == "offline"
    with pytest.raises(ValueError, match="mode="):
        WandbTracker(mode="cloud")


def test_online_without_a_key_fails_instead_of_prompting(tmp_path: Path) -> None:
    tracker = WandbTracker(mode="online", on_error="raise")
    with pytest.raises(RuntimeError, match="needs a W&B API key"):
        tracker.start("proj", {}, tmp_path)
    assert wandb_services() == []


def test_the_users_own_wandb_run_is_left_alone(tmp_path: Path) -> None:
    import wandb

    mine = wandb.init(project="mine", dir=str(tmp_path / "mine"), mode="offline", reinit="create_new")
    try:
        tracker = WandbTracker()
        tracker.start("proj", {}, tmp_path)
        tracker.log({"loss": 1.0}, step=1)
        tracker.finish()
        mine.log({"still_open": 1})  # a finished run would refuse this
        if HAVE_PROC:
            assert len(wandb_services()) == 1  # and its service still runs
    finally:
        mine.finish()
        wandb.teardown()
    assert history(read_records(tmp_path)) == {(1, "loss"): 1.0}
    assert wandb_services() == []
