"""Accelerate's own test scripts (test_script, test_sync, test_distributed_data_loop), making their calls from the
trainer paths (tests/compat/), under ``trainer launch --cpu`` on one process and on two.

Each script checks itself with upstream's assertions and, once it got through, writes one marker line
per process; a failed assertion exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_helpers import run_cli

COMPAT = Path(__file__).resolve().parent / "compat"


def _launch(script: str, processes: int, cwd: Path) -> str:
    """Launch ``script`` on ``processes`` CPU processes (in ``cwd``, where it may write files); its stdout."""
    code, out, err = run_cli("launch", "--num_processes", str(processes), "--cpu", str(COMPAT / script), cwd=cwd)
    assert code == 0, err
    return out


def _markers(out: str, name: str) -> list[str]:
    return sorted(line for line in out.splitlines() if line.startswith(f"{name} OK"))


@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_test_script(processes, tmp_path):
    out = _launch("test_script.py", processes, tmp_path)
    assert _markers(out, "TEST_SCRIPT") == [f"TEST_SCRIPT OK rank {rank}" for rank in range(processes)]
    assert out.count("Non-shuffled dataloader passing.") == 1  # printed by process 0 only
    assert not (tmp_path / "check_main_process_first.txt").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_test_sync(processes, tmp_path):
    out = _launch("test_sync.py", processes, tmp_path)
    assert _markers(out, "TEST_SYNC") == [f"TEST_SYNC OK rank {rank}" for rank in range(processes)]
    checks = "**Test NOOP `no_sync`" if processes == 1 else "**Test Distributed `no_sync` context manager with multiple"
    assert out.count(checks) == 1


def test_accelerate_test_distributed_data_loop(tmp_path):
    """Upstream's script asserts that it runs on exactly two processes."""
    out = _launch("test_distributed_data_loop.py", 2, tmp_path)
    assert _markers(out, "TEST_DATA_LOOP") == ["TEST_DATA_LOOP OK rank 0", "TEST_DATA_LOOP OK rank 1"]
    assert out.count("Test DataLoader with sampler as an instance of `BatchSampler`") == 1  # accelerator.print
