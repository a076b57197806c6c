"""The calls of Accelerate's test_utils/scripts/test_ops.py, made here from the trainer paths, on 1 or 2 processes.

Written for this project: the same functions, imported from the same module paths with `trainer`
in place of `accelerate`, called with the same arguments, each result checked exactly.
"""

import sys

import torch

from trainer import PartialState
from trainer.utils.dataclasses import DistributedType
from trainer.utils.operations import (
    broadcast,
    copy_tensor_to_devices,
    gather,
    gather_object,
    pad_across_processes,
    reduce,
)


def create_tensor(state):
    return (torch.arange(state.num_processes) + 1.0 + (state.num_processes * state.process_index)).to(state.device)


def check_gather(state):
    assert gather(create_tensor(state)).tolist() == list(range(1, state.num_processes**2 + 1))


def check_gather_object(state):
    gathered = gather_object([state.process_index])
    assert gathered == list(range(state.num_processes)), gathered


def check_gather_non_contiguous(state):
    tensor = torch.arange(12, device=state.device).view(4, 3).t()
    assert not tensor.is_contiguous()
    assert gather(tensor).shape == (3 * state.num_processes, 4)


def check_broadcast(state):
    broadcasted = broadcast(create_tensor(state))
    assert broadcasted.shape == torch.Size([state.num_processes])
    assert broadcasted.tolist() == list(range(1, state.num_processes + 1))


def check_pad_across_processes(state):
    if state.is_main_process:
        tensor = torch.arange(state.num_processes + 1).to(state.device)
    else:
        tensor = torch.arange(state.num_processes).to(state.device)
    padded = pad_across_processes(tensor)
    assert padded.shape == torch.Size([state.num_processes + 1])
    if not state.is_main_process:
        assert padded.tolist() == list(range(0, state.num_processes)) + [0]


def check_reduce_sum(state):
    if state.num_processes != 2:
        return
    reduced = reduce(create_tensor(state), "sum")
    assert torch.allclose(reduced, torch.tensor([4.0, 6.0]).to(state.device)), reduced


def check_reduce_mean(state):
    if state.num_processes != 2:
        return
    reduced = reduce(create_tensor(state), "mean")
    assert torch.allclose(reduced, torch.tensor([2.0, 3.0]).to(state.device)), reduced


def check_copy_tensor_to_devices(state):
    tensor = torch.tensor([1, 2, 3], dtype=torch.int).to(state.device) if state.is_main_process else None
    copied = copy_tensor_to_devices(tensor)
    assert torch.allclose(copied, torch.tensor([1, 2, 3], dtype=torch.int, device=state.device))


def main():
    state = PartialState()
    expected = DistributedType.NO if state.num_processes == 1 else DistributedType.MULTI_CPU
    assert state.distributed_type == expected, state.distributed_type
    for check in (check_gather, check_gather_object, check_gather_non_contiguous, check_broadcast,
                  check_pad_across_processes, check_reduce_sum, check_reduce_mean, check_copy_tensor_to_devices):
        check(state)
        state.print(f"passed {check.__name__}")
    state.wait_for_everyone()
    sys.stdout.write(f"OPS OK rank {state.process_index}\n")  # one write: the ranks share the pipe
    sys.stdout.flush()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
