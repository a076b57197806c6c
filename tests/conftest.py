"""Shared fixtures: every test starts with a fresh process state, and trackers stay out of the way."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from trainer import PartialState

# tests/compat holds scripts for `trainer launch` (some named like Accelerate's test_*.py scripts), not test modules.
collect_ignore_glob = ["compat/*"]


@pytest.fixture(autouse=True)
def fresh_state():
    """PartialState is process-wide; tests that build Accelerators must not see each other's."""
    PartialState._reset_state()
    yield
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def csv_only_by_default(monkeypatch):
    """Trainers in tests record with the CSV tracker only, unless a test names its trackers.

    The full default (CSV plus a local MLflow store) is tested on its own; starting MLflow in
    every Trainer test would only add seconds. No test may reach a tracking server by accident.
    """
    monkeypatch.setenv("TRAINER_TRACKERS", "csv")
    for name in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "COMET_API_KEY", "CLEARML_API_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")


# -- for the fault catalogue (tests/test_faults_*.py) -----------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """An output folder holding one epoch's checkpoint ``epoch=0-step=5`` (and ``latest``), made once per module."""
    from trainer_setup import make_trainer

    from trainer import PartialState
    from trainer.callbacks import ModelCheckpoint

    out = tmp_path_factory.mktemp("run")
    make_trainer(out, max_epochs=1, callbacks=[ModelCheckpoint(every_n_epochs=1)], trackers=[]).fit()
    PartialState._reset_state()
    return out


@pytest.fixture
def run_dir(finished_run, tmp_path) -> Path:
    """A copy of ``finished_run`` for one case to damage."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# -- a full disk (the checkpoint fault cases) ----------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs, with a checkpoint saved on it and ``latest`` pointing at it (skipped without root)."""
    from fault_helpers import saved_checkpoint

    from trainer.checkpoint_state import write_latest

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        path, weights = saved_checkpoint(mount)
        write_latest(mount, path)
        yield mount, path, weights
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
