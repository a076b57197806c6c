"""The Aim tracker: a real fit, read back through Aim's own SDK, must hold exactly what the Trainer logged."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
from tracker_helpers import csv_history
from trainer_setup import make_trainer

from callbacks.trackers import AimTracker, CSVTracker

aim = pytest.importorskip("aim")
from aim.storage.context import Context  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Anything Aim might write under HOME stays in the test's folder; no thread or process outlives a run."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIM_UI_TELEMETRY_ENABLED", "0")
    threads, children = set(threading.enumerate()), set(psutil.Process().children(recursive=True))
    yield
    assert set(threading.enumerate()) <= threads
    assert set(psutil.Process().children(recursive=True)) <= children


def indexed_run(repo_dir, run_hash: str):
    """The finished run as Aim's SDK reads it, after Aim's own CLI indexed the repository (as ``aim up`` does)."""
    subprocess.run([sys.executable, "-c", "from aim.cli.cli import cli_entry_point; cli_entry_point()",
                    "storage", "--repo", str(repo_dir), "reindex", "--yes"], check=True, capture_output=True, timeout=60)
    return aim.Run(run_hash, repo=str(repo_dir), read_only=True)


def aim_series(run) -> dict[str, list[tuple[int, float]]]:
    series = {}
    for metric in run.metrics():
        steps, (values,) = metric.data.view("val").items_list()
        series[metric.name] = sorted(zip(steps, values))
    return series


def aim_images(run, name: str) -> dict[int, np.ndarray]:
    steps, (images,) = run.get_image_sequence(name, Context({})).data.view("val").items_list()
    return {step: np.asarray(image.to_pil_image()) for step, image in zip(steps, images)}


def test_fit_metrics_and_config_read_back(tmp_path):
    tracker = AimTracker(on_error="raise")
    trainer = make_trainer(tmp_path, trackers=[CSVTracker(), tracker], log_every_n_steps=2, project="aim-test",
                           run_name="fit-run")
    trainer.fit()
    assert tracker.run_id is not None and not tracker.failed

    expected = csv_history(tmp_path)
    assert set(expected) == {"train_loss", "val_loss", "val_acc"}
    assert [step for step, _ in expected["train_loss"]] == [2, 4, 6, 8, 10, 12, 14]

    run = indexed_run(tmp_path, tracker.run_id)
    logged = aim_series(run)
    assert set(logged) == set(expected)
    for name, points in expected.items():
        # Aim keeps one value per step; the Trainer logs each (name, step) once.
        assert logged[name] == sorted(points), name
    hparams = run["hparams"]
    assert hparams["batch_size"] == 4 and hparams["max_epochs"] == 3 and hparams["max_steps"] is None
    assert run.experiment == "aim-test" and run.name == "fit-run"
    assert run.active is False  # closed at the end of fit


def test_images_and_artifacts_low_level(tmp_path):
    tracker = AimTracker(on_error="raise")
    tracker.start("proj", {"lr": 0.1, "nested": {"depth": 2}}, tmp_path)
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    chw = np.random.default_rng(0).integers(0, 2, (3, 4, 5)).astype(np.float32)  # CxHxW floats in 0..1
    tracker.log_images({"rgb": rgb, "chw": chw}, step=1)
    tracker.log_images({"rgb": rgb[::-1].copy()}, step=2)
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt")
    run_hash = tracker.run_id
    tracker.finish()

    run = indexed_run(tmp_path, run_hash)
    assert run["hparams"] == {"lr": 0.1, "nested": {"depth": 2}}
    rgb_images = aim_images(run, "rgb")
    assert sorted(rgb_images) == [1, 2]
    np.testing.assert_array_equal(rgb_images[1], rgb)  # stored as PNG: lossless
    np.testing.assert_array_equal(rgb_images[2], rgb[::-1])
    np.testing.assert_array_equal(aim_images(run, "chw")[1], chw.transpose(1, 2, 0).astype(np.uint8) * 255)
    artifact = run.artifacts["notes.txt"]
    assert Path(artifact.download(str(tmp_path / "downloaded"))).read_text() == "hello"


def test_resume_continues_the_same_run(tmp_path):
    first = AimTracker(on_error="raise")
    first.start("proj", {"seed": 1}, tmp_path)
    first.log({"loss": 1.0}, step=1)
    state = first.state_dict()
    first.finish()

    second = AimTracker(on_error="raise")
    second.load_state_dict(state)
    second.start("proj", {"seed": 1}, tmp_path)
    second.log({"loss": 0.5}, step=2)
    second.finish("failed")

    assert second.run_id == first.run_id
    run = indexed_run(tmp_path, first.run_id)
    assert aim_series(run) == {"loss": [(1, 1.0), (2, 0.5)]}
    assert run.tags == ["failed"]
