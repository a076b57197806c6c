"""Worker of tests/test_state_distributed.py: the ``Accelerator`` collectives on 2 CPU processes.

Run by torchrun (``--nproc_per_node 2``). The Accelerator gets the base ``Strategy`` object, which
implements the collectives with torch.distributed for any number of processes. Every check raises
on a wrong value; the last line printed is ``OK rank <rank>``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from strategies.base import Strategy
from trainer import Accelerator, PartialState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import RANK, expect, expect_same, fail, leave, say  # noqa: E402

PRINT_MARKER = "ACCELERATOR-PRINT-MARKER: printed by the main process only"












def check_setup(accelerator: Accelerator) -> None:
    expect(accelerator.distributed_type, "base", "distributed_type")
    expect(accelerator.device, torch.device("cpu"), "device")
    expect(accelerator.process_index, RANK, "process_index")
    expect(accelerator.local_process_index, RANK, "local_process_index")
    expect(accelerator.num_processes, 2, "num_processes")
    expect(accelerator.is_main_process, RANK == 0, "is_main_process")
    expect(accelerator.is_last_process, RANK == 1, "is_last_process")
    expect(accelerator.use_distributed, True, "use_distributed")
    expect(accelerator.mixed_precision, "no", "mixed_precision")
    expect((accelerator.strategy.process_index, accelerator.strategy.num_processes), (RANK, 2),
           "strategy rank layout")
    expect(accelerator.strategy.distributed_sampler_kwargs, {"num_replicas": 2, "rank": RANK},
           "distributed_sampler_kwargs")
    expect(accelerator.state.__dict__ is PartialState().__dict__, True, "Accelerator shares PartialState")
    expect(dist.get_backend(), "gloo", "backend")


def check_gather(accelerator: Accelerator) -> None:
    expect_same(accelerator.gather(torch.tensor([RANK, RANK + 10])), torch.tensor([0, 10, 1, 11]), "gather 1-d")
    expect_same(accelerator.gather(torch.full((2, 3), float(RANK))),
                torch.tensor([[0.0] * 3, [0.0] * 3, [1.0] * 3, [1.0] * 3]), "gather 2-d")
    expect_same(accelerator.gather(torch.tensor(RANK * 2.5)), torch.tensor([0.0, 2.5]), "gather 0-d")
    nested = {
        "a": torch.tensor([RANK]),
        "b": [torch.tensor([[RANK, -RANK]]), (torch.tensor(RANK + 0.5),)],
        "note": "not a tensor",
    }
    expect_same(accelerator.gather(nested), {
        "a": torch.tensor([0, 1]),
        "b": [torch.tensor([[0, 0], [1, -1]]), (torch.tensor([0.5, 1.5]),)],
        "note": "not a tensor",
    }, "gather nested dict")


def check_reduce(accelerator: Accelerator) -> None:
    value = torch.tensor([RANK + 1.0, 10.0 * (RANK + 1)])
    expect_same(accelerator.reduce(value, "sum"), torch.tensor([3.0, 30.0]), "reduce sum")
    expect_same(accelerator.reduce(value, "mean"), torch.tensor([1.5, 15.0]), "reduce mean")
    expect_same(accelerator.reduce(value, "max"), torch.tensor([2.0, 20.0]), "reduce max")
    expect_same(accelerator.reduce(value, "min"), torch.tensor([1.0, 10.0]), "reduce min")
    expect_same(accelerator.reduce(value), torch.tensor([3.0, 30.0]), "reduce default (sum)")
    expect_same(accelerator.reduce(value, "sum", scale=0.5), torch.tensor([1.5, 15.0]), "reduce sum scaled")
    expect_same(value, torch.tensor([RANK + 1.0, 10.0 * (RANK + 1)]), "reduce leaves its input unchanged")
    whole = torch.tensor([RANK + 1, 3])
    expect_same(accelerator.reduce(whole, "mean"), torch.tensor([1.5, 3.0]), "reduce mean of integers is float")
    expect_same(accelerator.reduce(whole, "sum"), torch.tensor([3, 6]), "reduce sum of integers stays integer")
    expect_same(accelerator.reduce({"loss": torch.tensor(RANK + 1.0), "n": [torch.tensor([RANK, 1])]}, "sum"),
                {"loss": torch.tensor(3.0), "n": [torch.tensor([1, 2])]}, "reduce nested sum")
    expect_same(accelerator.reduce(torch.tensor([RANK + 1, 5]), "sum"), torch.tensor([3, 10]), "reduce int sum")
    try:
        accelerator.reduce(value, "avg")
    except ValueError as error:
        expect(str(error), "reduction='avg' is not one of 'sum', 'mean', 'max', 'min'.", "bad reduction message")
    else:
        fail("reduce(..., 'avg')", "ValueError", "no error")


def check_pad_across_processes(accelerator: Accelerator) -> None:
    mine = [torch.tensor([1, 2]), torch.tensor([5, 6, 7, 8])][RANK]
    padded = accelerator.pad_across_processes(mine, pad_index=-1)
    expect_same(padded, [torch.tensor([1, 2, -1, -1]), torch.tensor([5, 6, 7, 8])][RANK], "pad, pad_index=-1")
    expect_same(accelerator.gather(padded), torch.tensor([1, 2, -1, -1, 5, 6, 7, 8]), "gather after padding")
    expect_same(accelerator.pad_across_processes(mine, pad_index=-1, pad_first=True),
                [torch.tensor([-1, -1, 1, 2]), torch.tensor([5, 6, 7, 8])][RANK], "pad_first=True")
    expect_same(accelerator.pad_across_processes(mine),
                [torch.tensor([1, 2, 0, 0]), torch.tensor([5, 6, 7, 8])][RANK], "pad default pad_index=0")

    # Along dim 1 of a 2-d tensor, inside a nested structure; the 0-d leaf is left alone.
    rows = [torch.ones(2, 1), torch.full((2, 3), 2.0)][RANK]
    result = accelerator.pad_across_processes({"ids": rows, "step": torch.tensor(RANK)}, dim=1, pad_index=9)
    expected_ids = [torch.tensor([[1.0, 9.0, 9.0], [1.0, 9.0, 9.0]]), torch.full((2, 3), 2.0)][RANK]
    expect_same(result, {"ids": expected_ids, "step": torch.tensor(RANK)}, "pad dim=1 nested")


def check_gather_for_metrics(accelerator: Accelerator) -> None:
    objects = [{"id": RANK, "text": f"sample of rank {RANK}"}, f"r{RANK}-second"]
    expect(accelerator.gather_for_metrics(objects, use_gather_object=True),
           [{"id": 0, "text": "sample of rank 0"}, "r0-second", {"id": 1, "text": "sample of rank 1"}, "r1-second"],
           "gather_for_metrics list of objects")
    expect(accelerator.gather_for_metrics(f"rank-{RANK}", use_gather_object=True), ["rank-0", "rank-1"],
           "gather_for_metrics single object")
    expect(accelerator.gather_for_metrics([RANK * 2, RANK * 2 + 1]), [0, 1, 2, 3],
           "gather_for_metrics list of ints (no tensors: gathered as objects)")
    expect_same(accelerator.gather_for_metrics(torch.tensor([RANK, RANK])), torch.tensor([0, 0, 1, 1]),
                "gather_for_metrics tensor")


def check_process_helpers(accelerator: Accelerator) -> None:
    accelerator.print(PRINT_MARKER)
    with accelerator.split_between_processes(list(range(5)), apply_padding=True) as share:
        expect(share, [[0, 1, 2], [3, 4, 4]][RANK], "Accelerator.split_between_processes")
    expect(accelerator.on_main_process(lambda: "main")(), "main" if RANK == 0 else None, "on_main_process")
    expect(accelerator.on_process(process_index=1)(lambda: "one")(), "one" if RANK == 1 else None,
           "on_process(process_index=1)")
    expect(accelerator.strategy.broadcast_object({"from": RANK}, src=1), {"from": 1}, "broadcast_object")
    accelerator.wait_for_everyone()


def main() -> None:
    accelerator = Accelerator(strategy=Strategy())
    check_setup(accelerator)
    check_gather(accelerator)
    check_reduce(accelerator)
    check_pad_across_processes(accelerator)
    check_gather_for_metrics(accelerator)
    check_process_helpers(accelerator)
    accelerator.end_training()
    accelerator.state.destroy_process_group()
    say(f"OK rank {RANK}")


if __name__ == "__main__":
    main()
    leave()
