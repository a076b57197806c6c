"""Worker of tests/test_state_distributed.py: ``PartialState`` on 2 CPU processes over gloo.

Run by torchrun (``--nproc_per_node 2``); ``sys.argv[1]`` is a directory both ranks share. Every
check raises on a wrong value; the last line printed is ``OK rank <rank>``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset

from trainer import PartialState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import RANK, expect, expect_same, leave, say  # noqa: E402

PRINT_MARKER = "STATE-PRINT-MARKER: printed by the main process only"








def check_facts(state: PartialState) -> None:
    expect(RANK in (0, 1), True, "torchrun RANK")
    expect(state.process_index, RANK, "process_index")
    expect(state.local_process_index, RANK, "local_process_index")
    expect(state.num_processes, 2, "num_processes")
    expect(state.is_main_process, RANK == 0, "is_main_process")
    expect(state.is_local_main_process, RANK == 0, "is_local_main_process")
    expect(state.is_last_process, RANK == 1, "is_last_process")
    expect(state.use_distributed, True, "use_distributed")
    expect(state.device, torch.device("cpu"), "device")
    expect(state.backend, "gloo", "backend")
    expect(state.cluster.launcher, "torchrun", "cluster.launcher")
    expect(state.cluster.master_addr, "127.0.0.1", "cluster.master_addr")
    expect(state.cluster.master_port, int(os.environ["MASTER_PORT"]), "cluster.master_port")
    expect(state.cluster.local_world_size, 2, "cluster.local_world_size")
    expect(dist.is_initialized(), True, "dist.is_initialized()")
    expect(dist.get_rank(), RANK, "dist.get_rank()")
    expect(dist.get_world_size(), 2, "dist.get_world_size()")
    expect(dist.get_backend(), "gloo", "dist.get_backend()")
    expect(repr(state), f"PartialState(device=cpu, process_index={RANK}, num_processes=2, "
                        "launcher='torchrun', backend='gloo')", "repr")
    # A Borg: a second instance shares every attribute (and starts no second process group).
    other = PartialState()
    expect(other.__dict__ is state.__dict__, True, "second PartialState shares the state")
    expect(other.process_index, RANK, "second PartialState process_index")


def check_main_process_first(state: PartialState, shared: Path) -> None:
    first, second = shared / "rank0-was-here", shared / "rank1-was-here"
    with state.main_process_first():
        if RANK == 0:
            time.sleep(0.5)  # were rank 1 not held back, it would have written its marker by now
            expect(second.exists(), False, "rank 1's marker inside rank 0's main_process_first block")
            first.write_text("0")
        else:
            expect(first.exists(), True, "rank 0's marker inside rank 1's main_process_first block")
            second.write_text("1")
    state.wait_for_everyone()
    expect((first.read_text(), second.read_text()), ("0", "1"), "both markers after the blocks")

    local_first, local_second = shared / "local0", shared / "local1"
    with state.local_main_process_first():
        if RANK == 0:
            time.sleep(0.5)
            expect(local_second.exists(), False, "rank 1's marker inside local_main_process_first (rank 0)")
            local_first.touch()
        else:
            expect(local_first.exists(), True, "rank 0's marker inside local_main_process_first (rank 1)")
            local_second.touch()
    state.wait_for_everyone()


def check_wait_for_everyone(state: PartialState, shared: Path) -> None:
    late = shared / "written-by-rank-1-before-the-barrier"
    if RANK == 1:
        time.sleep(0.5)
        late.write_text("late")
    state.wait_for_everyone()
    expect(late.exists(), True, "rank 1's file after wait_for_everyone")


def split(state: PartialState, inputs: Any, apply_padding: bool = False) -> Any:
    with state.split_between_processes(inputs, apply_padding=apply_padding) as share:
        return share


def check_split_between_processes(state: PartialState) -> None:
    five = list(range(5))
    expect(split(state, five), [[0, 1, 2], [3, 4]][RANK], "list of 5")
    expect(split(state, five, apply_padding=True), [[0, 1, 2], [3, 4, 4]][RANK], "padded list of 5")
    expect(split(state, [0, 1, 2, 3]), [[0, 1], [2, 3]][RANK], "list of 4")
    expect(split(state, ["only"]), [["only"], []][RANK], "list of 1")
    expect(split(state, ["only"], apply_padding=True), [["only"], ["only"]][RANK], "padded list of 1")

    expect(split(state, (0, 1, 2, 3, 4)), [(0, 1, 2), (3, 4)][RANK], "tuple of 5")
    expect(split(state, (0, 1, 2, 3, 4), apply_padding=True), [(0, 1, 2), (3, 4, 4)][RANK], "padded tuple")

    tensor = torch.arange(10).reshape(5, 2)
    expect_same(split(state, tensor), [tensor[:3], tensor[3:]][RANK], "tensor of 5 rows")
    expect_same(split(state, tensor, apply_padding=True),
                  [torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.tensor([[6, 7], [8, 9], [8, 9]])][RANK],
                  "padded tensor of 5 rows")

    columns = {"a": [0, 1, 2, 3, 4], "b": ["v", "w", "x", "y", "z"]}
    expect(split(state, columns),
           [{"a": [0, 1, 2], "b": ["v", "w", "x"]}, {"a": [3, 4], "b": ["y", "z"]}][RANK], "dict of lists")
    expect(split(state, columns, apply_padding=True),
           [{"a": [0, 1, 2], "b": ["v", "w", "x"]}, {"a": [3, 4, 4], "b": ["y", "z", "z"]}][RANK],
           "padded dict of lists")

    dataset = Dataset.from_dict({"x": [10, 11, 12, 13, 14], "y": ["a", "b", "c", "d", "e"]})
    share = split(state, dataset)
    expect(isinstance(share, Dataset), True, "a Dataset's share is a Dataset")
    expect(share.to_dict(), [{"x": [10, 11, 12], "y": ["a", "b", "c"]}, {"x": [13, 14], "y": ["d", "e"]}][RANK],
           "Dataset of 5 rows")
    expect(split(state, dataset, apply_padding=True).to_dict(),
           [{"x": [10, 11, 12], "y": ["a", "b", "c"]}, {"x": [13, 14, 14], "y": ["d", "e", "e"]}][RANK],
           "padded Dataset of 5 rows")


def check_decorators(state: PartialState) -> None:
    calls: list[str] = []

    @state.on_main_process
    def main_only(value: int) -> str:
        calls.append("main")
        return f"main got {value}"

    @state.on_process(process_index=1)
    def second_only(value: int) -> str:
        calls.append("second")
        return f"second got {value}"

    @state.on_last_process
    def last_only() -> str:
        calls.append("last")
        return "last"

    @state.on_local_main_process
    def local_main_only() -> str:
        calls.append("local main")
        return "local main"

    def plain() -> int:
        calls.append("plain")
        return 42

    expect(main_only(7), "main got 7" if RANK == 0 else None, "on_main_process")
    expect(second_only(8), "second got 8" if RANK == 1 else None, "on_process(process_index=1)")
    expect(last_only(), "last" if RANK == 1 else None, "on_last_process")
    expect(local_main_only(), "local main" if RANK == 0 else None, "on_local_main_process")
    expect(state.on_process(plain, process_index=0)(), 42 if RANK == 0 else None, "on_process(function, 0)")
    expect(calls, [["main", "local main", "plain"], ["second", "last"]][RANK], "functions that ran")
    expect(main_only.__name__, "main_only", "decorated function keeps its name")


def main() -> None:
    shared = Path(sys.argv[1])
    state = PartialState()
    check_facts(state)
    state.print(PRINT_MARKER)
    check_main_process_first(state, shared)
    check_wait_for_everyone(state, shared)
    check_split_between_processes(state)
    check_decorators(state)
    state.wait_for_everyone()
    state.destroy_process_group()
    expect(dist.is_initialized(), False, "process group after destroy_process_group")
    say(f"OK rank {RANK}")


if __name__ == "__main__":
    main()
    leave()
