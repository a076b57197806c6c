"""Shared fixtures: every test starts with a fresh process state, and trackers stay out of the way."""

from __future__ import annotations

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
