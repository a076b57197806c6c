"""The calls of Accelerate's test_utils/scripts/test_script.py, made here from the trainer paths, on 1 or 2 processes.

Written for this project: the same functions in the same order, imported from the same module paths
with ``trainer`` in place of ``accelerate``, called with the same arguments and checked by the same
assertions. What upstream runs only on a GPU, XLA, MPS, HPU or DeepSpeed, or only with an optional
package, is skipped here where upstream skips it (it branches on the distributed type and on what is
available). Each process ends by writing ``TEST_SCRIPT OK rank <i>``.
"""

import contextlib
import io
import math
import os
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainer import Accelerator
from trainer.data_loader import SeedableRandomSampler, prepare_data_loader
from trainer.state import AcceleratorState
from trainer.test_utils import RegressionDataset, RegressionModel, are_the_same_tensors
from trainer.utils import (
    DataLoaderConfiguration,
    DistributedType,
    gather,
    gather_object,
    is_bf16_available,
    is_cuda_available,
    is_datasets_available,
    is_fp16_available,
    is_hpu_available,
    is_mps_available,
    is_pytest_available,
    set_seed,
    synchronize_rng_states,
)

if is_hpu_available():
    ATOL = 1e-3
    RTOL = 1e-3
else:
    ATOL = 1e-6
    RTOL = 1e-6


def generate_baseline_dataloader(train_set, generator, batch_size, use_seedable_sampler=False):
    """A shuffled DataLoader over ``train_set``: through a SeedableRandomSampler, or DataLoader's own shuffle."""
    if use_seedable_sampler:
        sampler = SeedableRandomSampler(generator=generator, data_source=train_set, num_samples=len(train_set))
        return DataLoader(train_set, batch_size=batch_size, sampler=sampler)
    return DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator)


def print_main(state):
    print(f"Printing from the main process {state.process_index}")


def print_local_main(state):
    print(f"Printing from the local main process {state.local_process_index}")


def print_last(state):
    print(f"Printing from the last process {state.process_index}")


def print_on(state, process_idx):
    print(f"Printing from process {process_idx}: {state.process_index}")


def _captured(buffer, function, *args):
    """Call ``function(*args)`` with stdout sent to ``buffer``; return what it printed, and empty the buffer."""
    with contextlib.redirect_stdout(buffer):
        function(*args)
    text = buffer.getvalue().rstrip()
    buffer.truncate(0)
    buffer.seek(0)
    return text


def process_execution_check():
    accelerator = Accelerator()
    num_processes = accelerator.num_processes
    path = Path("check_main_process_first.txt")
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            time.sleep(0.1)  # the main process is the slow one: it must still write first
            with open(path, "a+") as f:
                f.write("Currently in the main process\n")
        else:
            with open(path, "a+") as f:
                f.write("Now on another process\n")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        with open(path) as f:
            text = "".join(f.readlines())
        try:
            assert text.startswith("Currently in the main process\n"), "the main process did not write first"
            if num_processes > 1:
                assert text.endswith("Now on another process\n"), "the main process did not write first"
            assert text.count("Now on another process\n") == accelerator.num_processes - 1, (
                f"{text.count('Now on another process') + 1} writes instead of {accelerator.num_processes}")
        except AssertionError:
            path.unlink()
            raise

    if accelerator.is_main_process and path.exists():
        path.unlink()
    accelerator.wait_for_everyone()

    f = io.StringIO()
    result = _captured(f, accelerator.on_main_process(print_main), accelerator.state)
    if accelerator.is_main_process:
        assert result == "Printing from the main process 0", result
    else:
        assert result == "", result

    result = _captured(f, accelerator.on_local_main_process(print_local_main), accelerator.state)
    if accelerator.is_local_main_process:
        assert result == "Printing from the local main process 0", result
    else:
        assert result == "", result

    result = _captured(f, accelerator.on_last_process(print_last), accelerator.state)
    if accelerator.is_last_process:
        assert result == f"Printing from the last process {accelerator.state.num_processes - 1}", result
    else:
        assert result == "", result

    for process_idx in range(num_processes):
        result = _captured(f, accelerator.on_process(print_on, process_index=process_idx), accelerator.state, process_idx)
        if accelerator.process_index == process_idx:
            assert result == f"Printing from process {process_idx}: {accelerator.process_index}", result
        else:
            assert result == "", result


def init_state_check():
    state = AcceleratorState()  # a second one in a row must work
    if state.local_process_index == 0:
        print("Testing, testing. 1, 2, 3.")
    print(state)


def rng_sync_check():
    state = AcceleratorState()
    synchronize_rng_states(["torch"])
    assert are_the_same_tensors(torch.get_rng_state()), "the CPU RNG states differ across processes"
    if state.distributed_type == DistributedType.MULTI_GPU:
        synchronize_rng_states(["cuda"])
        assert are_the_same_tensors(torch.cuda.get_rng_state()), "the GPU RNG states differ across processes"
    elif state.distributed_type == DistributedType.MULTI_XPU:
        synchronize_rng_states(["xpu"])
        assert are_the_same_tensors(torch.xpu.get_rng_state()), "the XPU RNG states differ across processes"
    generator = torch.Generator()
    synchronize_rng_states(["generator"], generator=generator)
    assert are_the_same_tensors(generator.get_state()), "the generator states differ across processes"

    if state.local_process_index == 0:
        print("All rng are properly synched.")


def _gathered(dl):
    """Every batch of ``dl``, gathered from all processes, concatenated."""
    return torch.cat([gather(batch) for batch in dl])


def dl_preparation_check():
    state = AcceleratorState()
    length = 32 * state.num_processes

    dl = DataLoader(range(length), batch_size=8)
    dl = prepare_data_loader(dl, state.device, state.num_processes, state.process_index, put_on_device=True)
    assert torch.equal(_gathered(dl).cpu(), torch.arange(0, length).long()), "wrong unshuffled result"

    dl = DataLoader(range(length), batch_size=8)
    dl = prepare_data_loader(dl, state.device, state.num_processes, state.process_index, put_on_device=True,
                             split_batches=True)
    assert torch.equal(_gathered(dl).cpu(), torch.arange(0, length).long()), "wrong unshuffled result (split)"

    if state.process_index == 0:
        print("Non-shuffled dataloader passing.")

    dl = DataLoader(range(length), batch_size=8, shuffle=True)
    dl = prepare_data_loader(dl, state.device, state.num_processes, state.process_index, put_on_device=True)
    assert sorted(_gathered(dl).tolist()) == list(range(length)), "wrong shuffled result"

    dl = DataLoader(range(length), batch_size=8, shuffle=True)
    dl = prepare_data_loader(dl, state.device, state.num_processes, state.process_index, put_on_device=True,
                             split_batches=True)
    assert sorted(_gathered(dl).tolist()) == list(range(length)), "wrong shuffled result (split)"

    if state.local_process_index == 0:
        print("Shuffled dataloader passing.")


def central_dl_preparation_check():
    state = AcceleratorState()
    length = 32 * state.num_processes

    dl = DataLoader(range(length), batch_size=8)
    dl = prepare_data_loader(dl, state.device, state.num_processes, state.process_index, put_on_device=True,
                             dispatch_batches=True)
    assert torch.equal(_gathered(dl).cpu(), torch.arange(0, length).long()), "wrong unshuffled dispatched result"

    dl = DataLoader(range(length), batch_size=8)
    dl = prepare_data_loader(dl, state.device, state.num_processes, state.process_index, put_on_device=True,
                             split_batches=True, dispatch_batches=True)
    assert torch.equal(_gathered(dl).cpu(), torch.arange(0, length).long()), "wrong unshuffled dispatched result (split)"

    if state.process_index == 0:
        print("Non-shuffled central dataloader passing.")

    dl = DataLoader(range(length), batch_size=8, shuffle=True)
    dl = prepare_data_loader(dl, state.device, state.num_processes, state.process_index, put_on_device=True,
                             dispatch_batches=True)
    assert sorted(_gathered(dl).tolist()) == list(range(length)), "wrong shuffled dispatched result"

    dl = DataLoader(range(length), batch_size=8, shuffle=True)
    dl = prepare_data_loader(dl, state.device, state.num_processes, state.process_index, put_on_device=True,
                             split_batches=True, dispatch_batches=True)
    assert sorted(_gathered(dl).tolist()) == list(range(length)), "wrong shuffled dispatched result (split)"

    if state.local_process_index == 0:
        print("Shuffled central dataloader passing.")


def custom_sampler_check():
    state = AcceleratorState()

    class CustomDataset(Dataset):
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):
            return self.data[index]

    class CustomBatchSampler:
        def __init__(self, dataset_length: int, batch_size: int, shuffle: bool = True):
            self.batch_size = batch_size
            self.data_index = np.arange(dataset_length)
            self.shuffle = shuffle

        def __iter__(self):
            index = np.random.permutation(self.data_index) if self.shuffle else self.data_index
            yield from np.array_split(index, len(self))

        def __len__(self):
            return math.ceil(len(self.data_index) / self.batch_size)

    dataset = CustomDataset(range(32 * state.num_processes))
    sampler = CustomBatchSampler(len(dataset), batch_size=8)
    dl = DataLoader(dataset, batch_sampler=sampler)
    dl = prepare_data_loader(dl, state.device, state.num_processes, state.process_index)
    # The custom batch sampler must survive preparation, possibly wrapped (as dl.batch_sampler.batch_sampler).
    if hasattr(dl.batch_sampler, "batch_sampler"):
        assert isinstance(dl.batch_sampler.batch_sampler, CustomBatchSampler), "the custom sampler was replaced"
    else:
        assert isinstance(dl.batch_sampler, CustomBatchSampler), "the custom sampler was replaced"


def check_seedable_sampler():
    set_seed(42)
    train_set = RegressionDataset(length=10, seed=42)
    train_dl = DataLoader(train_set, batch_size=2, shuffle=True)

    config = DataLoaderConfiguration(use_seedable_sampler=True)
    accelerator = Accelerator(dataloader_config=config)
    train_dl = accelerator.prepare(train_dl)
    original_items = torch.cat([batch["x"] for _ in range(3) for batch in train_dl])

    set_seed(42)
    train_dl.set_epoch(0)
    new_items = torch.cat([batch["x"] for _ in range(3) for batch in train_dl])
    assert torch.allclose(original_items, new_items), "the same seed and epoch gave other items"


def check_seedable_sampler_in_batch_sampler_shard():
    set_seed(42)

    config = DataLoaderConfiguration(use_seedable_sampler=True)
    accelerator = Accelerator(dataloader_config=config)
    assert accelerator.num_processes > 1, "this check needs more than one process"

    dataloader = DataLoader(list(range(10)), batch_size=1, shuffle=True)
    prepared_data_loader = prepare_data_loader(dataloader=dataloader, use_seedable_sampler=True)

    target_sampler = prepared_data_loader.batch_sampler.batch_sampler.sampler
    assert isinstance(target_sampler, SeedableRandomSampler), f"the sharded sampler is a {type(target_sampler)}"


def check_seedable_sampler_with_data_seed():
    set_seed(42)
    data_seed = 42
    train_set = RegressionDataset(length=10, seed=42)
    train_dl = DataLoader(train_set, batch_size=2, shuffle=True)

    config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed)
    accelerator = Accelerator(dataloader_config=config)
    prepared_dl = accelerator.prepare(train_dl)
    original_items = torch.cat([batch["x"] for _ in range(3) for batch in prepared_dl])

    config.data_seed = 43
    accelerator = Accelerator(dataloader_config=config)
    prepared_dl = accelerator.prepare(train_dl)
    new_items = torch.cat([batch["x"] for _ in range(3) for batch in prepared_dl])
    assert not torch.allclose(original_items, new_items), "another data seed gave the same items"


def mock_training(length, batch_size, generator, use_seedable_sampler=False):
    set_seed(42)
    generator.manual_seed(42)
    train_set = RegressionDataset(length=length, seed=42)

    train_dl = generate_baseline_dataloader(train_set, generator, batch_size, use_seedable_sampler)
    model = RegressionModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _epoch in range(3):
        for batch in train_dl:
            model.zero_grad()
            output = model(batch["x"])
            loss = torch.nn.functional.mse_loss(output, batch["y"])
            loss.backward()
            optimizer.step()
    return train_set, model


def _train_prepared(accelerator, train_dl, generator):
    """Prepare a fresh RegressionModel and SGD with ``train_dl``; train 3 epochs; return the unwrapped model on CPU."""
    model = RegressionModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_dl, model, optimizer = accelerator.prepare(train_dl, model, optimizer)
    set_seed(42)
    generator.manual_seed(42)
    for _ in range(3):
        for batch in train_dl:
            model.zero_grad()
            output = model(batch["x"])
            loss = torch.nn.functional.mse_loss(output, batch["y"])
            accelerator.backward(loss)
            optimizer.step()
    return accelerator.unwrap_model(model).cpu()


def _assert_same_model(old_model, model):
    for name in ("a", "b"):
        torch.testing.assert_close(
            getattr(old_model, name), getattr(model, name), atol=ATOL, rtol=RTOL,
            msg=lambda msg: f"the single-process and the distributed training disagree\n{msg}")


def training_check(use_seedable_sampler=False):
    state = AcceleratorState()
    generator = torch.Generator()
    batch_size = 8
    length = batch_size * 4 * state.num_processes

    train_set, old_model = mock_training(length, batch_size * state.num_processes, generator, use_seedable_sampler)
    assert are_the_same_tensors(old_model.a), "the baseline models differ across processes"
    assert are_the_same_tensors(old_model.b), "the baseline models differ across processes"

    accelerator = Accelerator()
    train_dl = generate_baseline_dataloader(train_set, generator, batch_size, use_seedable_sampler)
    _assert_same_model(old_model, _train_prepared(accelerator, train_dl, generator))
    accelerator.print("Training yielded the same results on one CPU or distributed setup with no batch split.")

    dataloader_config = DataLoaderConfiguration(split_batches=True, use_seedable_sampler=use_seedable_sampler)
    accelerator = Accelerator(dataloader_config=dataloader_config)
    train_dl = generate_baseline_dataloader(train_set, generator, batch_size * state.num_processes, use_seedable_sampler)
    _assert_same_model(old_model, _train_prepared(accelerator, train_dl, generator))
    accelerator.print("Training yielded the same results on one CPU or distributed setup with batch split.")

    if is_cuda_available() or is_mps_available():
        print("Keep fp32 wrapper check.")
        AcceleratorState._reset_state()
        accelerator = Accelerator(mixed_precision="fp16")
        model = accelerator.prepare(torch.nn.Linear(2, 4))
        model_with_fp32_wrapper = accelerator.unwrap_model(model, keep_fp32_wrapper=True)
        # With the autocast wrapper kept, a float16 input must not fail.
        input_tensor = torch.Tensor([1, 2]).to(dtype=torch.float16, device=accelerator.device)
        model_with_fp32_wrapper(input_tensor)

    if is_bf16_available():
        print("BF16 training check.")
        AcceleratorState._reset_state()
        dataloader_config = DataLoaderConfiguration(use_seedable_sampler=use_seedable_sampler)
        accelerator = Accelerator(mixed_precision="bf16", dataloader_config=dataloader_config)
        train_dl = generate_baseline_dataloader(train_set, generator, batch_size, use_seedable_sampler)
        _assert_same_model(old_model, _train_prepared(accelerator, train_dl, generator))

    if is_fp16_available() and not is_hpu_available():
        print("FP16 training check.")
        AcceleratorState._reset_state()
        dataloader_config = DataLoaderConfiguration(use_seedable_sampler=use_seedable_sampler)
        accelerator = Accelerator(mixed_precision="fp16", dataloader_config=dataloader_config)
        train_dl = generate_baseline_dataloader(train_set, generator, batch_size, use_seedable_sampler)
        _assert_same_model(old_model, _train_prepared(accelerator, train_dl, generator))


def test_split_between_processes_dataset(datasets_Dataset):  # noqa: N803 - the upstream parameter name
    state = AcceleratorState()
    data = datasets_Dataset.from_list([dict(k=v) for v in range(2 * state.num_processes)])
    with state.split_between_processes(data, apply_padding=False) as results:
        assert len(results) == 2, f"process {state.process_index} got {len(results)} items, not 2"

    data = datasets_Dataset.from_list([dict(k=v) for v in range(2 * state.num_processes - 1)])
    with state.split_between_processes(data, apply_padding=False) as results:
        if state.is_last_process:
            assert len(results) == 1, f"the last process got {len(results)} items, not 1"
        else:
            assert len(results) == 2, f"process {state.process_index} got {len(results)} items, not 2"
    state.wait_for_everyone()

    odd_data = datasets_Dataset.from_list([dict(k=v) for v in range(2 * state.num_processes - 1)])
    even_data = datasets_Dataset.from_list([dict(k=v) for v in range(2 * state.num_processes)])

    for data in [odd_data, even_data]:
        expected_output = data["k"]

        with state.split_between_processes(data, apply_padding=True) as results:
            if state.num_processes == 1:
                assert len(results) == len(data), f"one process got {len(results)} of {len(data)} items"
            else:
                assert len(results) == 2, f"process {state.process_index} got {len(results)} items, not 2"
            results_per_process = list(results)

        state.wait_for_everyone()

        gathered_results = gather_object(results_per_process)
        output = [r["k"] for r in gathered_results[: len(data)]]
        assert expected_output == output, f"gathered {output}, expected {expected_output}"


def test_split_between_processes_list():
    state = AcceleratorState()
    data = list(range(0, 2 * state.num_processes))
    with state.split_between_processes(data) as results:
        assert len(results) == 2, f"process {state.process_index} got {len(results)} items, not 2"
    state.wait_for_everyone()

    even_data = list(range(0, (2 * state.num_processes)))
    odd_data = list(range(0, (2 * state.num_processes) - 1))
    for data in [odd_data, even_data]:
        expected_output = data

        with state.split_between_processes(data, apply_padding=True) as results:
            num_samples_per_device = math.ceil(len(data) / state.num_processes)
            assert len(results) == num_samples_per_device, (
                f"process {state.process_index} got {len(results)} items, not {num_samples_per_device}")
            results_per_process = list(results)

        state.wait_for_everyone()

        gathered_results = gather_object(results_per_process)
        output = gathered_results[: len(data)]
        assert expected_output == output, f"gathered {output}, expected {expected_output}"


def test_split_between_processes_nested_dict():
    state = AcceleratorState()
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = ["a", "b", "c", "d", "e", "f", "g", "h"]
    c = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    if state.num_processes in (1, 2, 4):
        data = {"a": a, "b": b, "c": c}
        data_copy = deepcopy(data)
        with state.split_between_processes(data) as results:
            share = 8 // state.num_processes
            for key in ("a", "b"):
                if state.process_index == 0:
                    assert results[key] == data_copy[key][:share], results[key]
                elif state.num_processes == 2:
                    assert results[key] == data_copy[key][4:], results[key]
                elif state.process_index == 3:
                    assert results[key] == data_copy[key][-2:], results[key]
            if state.process_index == 0:
                assert torch.allclose(results["c"], data_copy["c"][:share]), results["c"]
            elif state.num_processes == 2:
                assert torch.allclose(results["c"], data_copy["c"][4:]), results["c"]
            elif state.process_index == 3:
                assert torch.allclose(results["c"], data_copy["c"][-2:]), results["c"]

    state.wait_for_everyone()


def test_split_between_processes_tensor():
    state = AcceleratorState()
    if state.num_processes > 1:
        data = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]).to(state.device)
        with state.split_between_processes(data) as results:
            if state.process_index == 0:
                expected = torch.tensor([[0, 1, 2, 3]]).to(state.device)
            else:
                expected = torch.tensor([[4, 5, 6, 7]]).to(state.device)
            torch.testing.assert_close(results, expected)
        state.wait_for_everyone()

    even_data = torch.tensor([[i] for i in range(2 * state.num_processes)]).to(state.device)
    odd_data = torch.tensor([[i] for i in range(2 * state.num_processes - 1)]).to(state.device)
    for data in [even_data, odd_data]:
        expected_output = [torch.tensor(i) for i in data.tolist()]

        with state.split_between_processes(data, apply_padding=True) as results:
            num_samples_per_device = math.ceil(len(data) / state.num_processes)
            assert len(results) == num_samples_per_device, (
                f"process {state.process_index} got {len(results)} items, not {num_samples_per_device}")
            results_per_process = [result.to("cpu") for result in results]

        state.wait_for_everyone()

        gathered_results = gather_object(results_per_process)
        output = gathered_results[: len(data)]
        assert expected_output == output, f"gathered {output}, expected {expected_output}"


def test_split_between_processes_evenly():
    state = AcceleratorState()
    if state.num_processes in (1, 2, 4, 8):
        data = list(range(17))
        num_samples_per_process = len(data) // state.num_processes
        num_extras = len(data) % state.num_processes
        with state.split_between_processes(data) as results:
            if state.process_index < num_extras:
                assert len(results) == num_samples_per_process + 1, f"{len(results)} != {num_samples_per_process + 1}"
            else:
                assert len(results) == num_samples_per_process, f"{len(results)} != {num_samples_per_process}"
    state.wait_for_everyone()


def test_trigger():
    accelerator = Accelerator()
    assert accelerator.check_trigger() is False  # nothing set yet

    if accelerator.is_main_process:
        accelerator.set_trigger()

    assert accelerator.check_trigger() is True  # seen by every process (an all-reduce)
    assert accelerator.check_trigger() is False  # and reset by that check


def test_reinstantiated_state():
    import pytest

    AcceleratorState._reset_state()
    simple_model = torch.nn.Linear(1, 1)
    accelerator = Accelerator()
    AcceleratorState._reset_state()  # the accelerator's state is gone now
    with pytest.raises(AttributeError) as cm:
        accelerator.prepare(simple_model)
    assert "`AcceleratorState` object has no attribute" in str(cm.value.args[0])
    assert "This happens if `AcceleratorState._reset_state()`" in str(cm.value.args[0])


def main():
    accelerator = Accelerator()
    state = accelerator.state
    if state.local_process_index == 0:
        print("**Initialization**")
    init_state_check()
    state.wait_for_everyone()

    if state.distributed_type == DistributedType.MULTI_GPU:
        num_processes_per_node = torch.cuda.device_count()
    else:
        num_processes_per_node = state.num_processes

    if num_processes_per_node == state.num_processes:  # one machine only
        if state.process_index == 0:
            print("\n**Test process execution**")
        process_execution_check()

        if state.process_index == 0:
            print("\n**Test split between processes as a list**")
        test_split_between_processes_list()

        if state.process_index == 0:
            print("\n**Test split between processes as a dict**")
        test_split_between_processes_nested_dict()

        if state.process_index == 0:
            print("\n**Test split between processes as a tensor**")
        test_split_between_processes_tensor()

        if state.process_index == 0:
            print("\n**Test split between processes evenly**")
        test_split_between_processes_evenly()

        if state.process_index == 0:
            print("\n**Test split between processes as a datasets.Dataset**")
        if is_datasets_available():
            from datasets import Dataset as datasets_Dataset

            test_split_between_processes_dataset(datasets_Dataset)
        else:
            print("Skipped because Hugging Face datasets is not available")

    if state.local_process_index == 0:
        print("\n**Test random number generator synchronization**")
    rng_sync_check()

    if state.local_process_index == 0:
        print("\n**DataLoader integration test**")
    dl_preparation_check()
    if state.distributed_type != DistributedType.XLA:
        central_dl_preparation_check()
        custom_sampler_check()
        check_seedable_sampler()
        check_seedable_sampler_with_data_seed()

    if state.num_processes > 1:
        check_seedable_sampler_in_batch_sampler_shard()

    if state.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed trains differently from the CPU baseline
        return

    if state.local_process_index == 0:
        print("\n**Training integration test**")
    training_check(use_seedable_sampler=False)
    training_check(use_seedable_sampler=True)

    if state.local_process_index == 0:
        print("\n**Breakpoint trigger test**")
    test_trigger()

    if is_pytest_available():
        if state.local_process_index == 0:
            print("\n**Test reinstantiated state**")
        test_reinstantiated_state()

    state.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.write(f"TEST_SCRIPT OK rank {os.environ.get('RANK', '0')}\n")  # one write: the ranks share the pipe
    sys.stdout.flush()
