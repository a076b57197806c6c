"""Scripts that make Accelerate's calls from the trainer paths (tests/compat/), on one process and on two."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_helpers import run_cli

COMPAT = Path(__file__).resolve().parent / "compat"


@pytest.mark.parametrize("processes", [1, 2])
def test_the_operations_script(processes):
    code, out, err = run_cli("launch", "--num_processes", str(processes), "--cpu", str(COMPAT / "ops_script.py"))
    assert code == 0, err
    assert sorted(line for line in out.splitlines() if line.startswith("OPS OK")) == [
        f"OPS OK rank {rank}" for rank in range(processes)]
    assert out.count("passed check_copy_tensor_to_devices") == 1  # printed by the main process only
