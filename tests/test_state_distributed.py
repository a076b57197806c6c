"""Real two-process tests of ``PartialState`` and the ``Accelerator`` collectives.

Why subprocesses: a process can join only one default torch.distributed process group, and
``PartialState`` is a process-wide Borg that starts that group on first use, so the pytest process
itself cannot play two ranks. Each test therefore launches a worker script under torchrun
(``python -m torch.distributed.run --nproc_per_node 2``) on 127.0.0.1 with the gloo backend and the
CPU forced (``TRAINER_USE_CPU=1``). The workers in ``tests/workers/`` check every value themselves
(a wrong value raises, which makes torchrun exit non-zero) and end by printing ``OK rank <n>``;
the tests here assert the exit status, that marker for both ranks and what ``print`` wrote.
Launch and cleanup (a timeout kills the whole process group) live in ``distributed_helpers``.
Many checks share one launch because each torchrun start costs a few seconds.
"""

from __future__ import annotations

import re

from distributed_helpers import WORKERS_DIR, run_distributed


def _assert_both_ranks_ok(stdout: str) -> None:
    for rank in (0, 1):
        lines = re.findall(rf"^OK rank {rank}$", stdout, flags=re.MULTILINE)
        assert lines == [f"OK rank {rank}"], f"rank {rank} did not report success:\n{stdout}"


def test_partial_state_on_two_processes(tmp_path):
    """Rank facts, gloo backend, print once, main_process_first order, barrier, splitting, decorators."""
    shared = tmp_path / "shared"
    shared.mkdir()
    result = run_distributed(WORKERS_DIR / "state_worker.py", nproc=2, args=[str(shared)])
    _assert_both_ranks_ok(result.stdout)
    assert result.stdout.count("STATE-PRINT-MARKER: printed by the main process only") == 1, result.stdout
    assert sorted(p.name for p in shared.iterdir()) == [
        "local0", "local1", "rank0-was-here", "rank1-was-here", "written-by-rank-1-before-the-barrier"]


def test_accelerator_collectives_on_two_processes():
    """gather (1-d, 0-d, nested), reduce, pad_across_processes, gather_for_metrics with objects."""
    result = run_distributed(WORKERS_DIR / "accelerator_worker.py", nproc=2)
    _assert_both_ranks_ok(result.stdout)
    assert result.stdout.count("ACCELERATOR-PRINT-MARKER: printed by the main process only") == 1, result.stdout
