"""Shared fixtures: every test starts with a fresh process state."""

from __future__ import annotations

import pytest

from trainer import PartialState


@pytest.fixture(autouse=True)
def fresh_state():
    """PartialState is process-wide; tests that build Accelerators must not see each other's."""
    PartialState._reset_state()
    yield
    PartialState._reset_state()
