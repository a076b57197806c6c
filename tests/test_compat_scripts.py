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


def test_triggers_fire_on_every_process_and_the_logger_knows_its_process():
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", str(COMPAT / "trigger_logging_script.py"))
    assert code == 0, err
    lines = out.splitlines()
    assert sorted(line for line in lines if line.startswith("TRIGGER OK")) == ["TRIGGER OK rank 0", "TRIGGER OK rank 1"]
    assert lines.count("[RANK 0] from the main process only") == 1 and lines.count("[RANK 0] once") == 1
    ordered = [line for line in lines if "in order" in line]
    assert ordered == ["[RANK 0] in order from process 0", "[RANK 1] in order from process 1"]
