"""``trainer.test_utils.testing``: what Accelerate's tests import from ``accelerate.test_utils.testing``.

The device facts (``torch_device``, ``device_count``, ``memory_allocated_func``), the launch command, the
skip decorators (``trainer.test_utils.decorators``), subprocess helpers (``trainer.test_utils.subprocesses``),
test-case base classes and small assertion helpers.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import unittest
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import trainer
from trainer.state import AcceleratorState, PartialState
from trainer.test_utils.backend import device_count, memory_allocated_func, torch_device
from trainer.test_utils.decorators import (
    parse_flag_from_env,
    require_aim,
    require_bnb,
    require_clearml,
    require_comet_ml,
    require_cpu,
    require_cuda,
    require_cuda_or_hpu,
    require_cuda_or_xpu,
    require_datasets,
    require_deepspeed,
    require_dvclive,
    require_fp8,
    require_fp16,
    require_fsdp2,
    require_huggingface_suite,
    require_import_timer,
    require_matplotlib,
    require_mlflow,
    require_mlu,
    require_mps,
    require_multi_device,
    require_multi_gpu,
    require_multi_gpu_or_xpu,
    require_multi_xpu,
    require_musa,
    require_neuron,
    require_non_cpu,
    require_non_hpu,
    require_non_torch_xla,
    require_non_xpu,
    require_npu,
    require_pandas,
    require_pippy,
    require_schedulefree,
    require_sdaa,
    require_single_device,
    require_single_gpu,
    require_single_xpu,
    require_swanlab,
    require_tensorboard,
    require_timm,
    require_torch_min_version,
    require_torchao,
    require_torchdata_stateful_dataloader,
    require_torchvision,
    require_tp,
    require_tpu,
    require_trackers,
    require_trackio,
    require_transformer_engine,
    require_transformer_engine_mxfp8,
    require_transformers,
    require_triton,
    require_wandb,
    require_xpu,
    run_first,
    skip,
    slow,
)
from trainer.test_utils.subprocesses import RunOutput, SubprocessCallException, execute_subprocess_async, run_command
from trainer.utils.operations import gather


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("trainer")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "trainer.cli.main"]


def get_launch_command(**kwargs: Any) -> list[str]:
    """The ``trainer launch`` command line with ``kwargs`` as options, for ``subprocess``.

    ``True`` becomes a bare ``--flag``; ``False`` and ``None`` are left out; anything else is ``--key=value``.
    ``get_launch_command(num_processes=2, cpu=True)`` -> ``[<trainer>, "launch", "--num_processes=2", "--cpu"]``,
    where ``<trainer>`` is this interpreter's ``trainer`` command (or ``python -m trainer.cli.main``).
    """
    command = [*_cli(), "launch"]
    for key, value in kwargs.items():
        if isinstance(value, bool):
            if value:
                command.append(f"--{key}")
        elif value is not None:
            command.append(f"--{key}={value}")
    return command


DEFAULT_LAUNCH_COMMAND = get_launch_command(num_processes=device_count, monitor_interval=0.1)
"""A launch on every device of the machine (one process on the CPU)."""


def are_the_same_tensors(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds the same values on every process (gathers it; every process must call this)."""
    state = PartialState()
    local = tensor[None].clone().to(state.device)
    everyone = gather(local).cpu()
    mine = local[0].cpu()
    return all(torch.equal(everyone[i], mine) for i in range(everyone.shape[0]))


@contextlib.contextmanager
def assert_exception(exception_class: type[BaseException], msg: str | None = None) -> Iterator[None]:
    """Assert that the block raises ``exception_class`` (with ``msg`` in its text, when given); the raise is absorbed."""
    try:
        yield
    except Exception as error:
        assert isinstance(error, exception_class), f"Expected exception of type {exception_class} but got {type(error)}"
        if msg is not None:
            assert msg in str(error), f"Expected message '{msg}' to be in exception but got '{error}'"
        return
    raise AssertionError(f"Expected exception of type {exception_class} but ran without issue.")


def capture_call_output(func: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """What ``func(*args, **kwargs)`` printed to stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        func(*args, **kwargs)
    return buffer.getvalue()


def path_in_trainer_package(*components: str) -> Path:
    """A path inside the installed ``trainer`` package: its directory joined with ``components``."""
    return Path(trainer.__file__).resolve().parent.joinpath(*components)


path_in_accelerate_package = path_in_trainer_package  # the upstream name


@contextlib.contextmanager
def mockenv_context(*remove: str, **update: str) -> Iterator[None]:
    """Within the block, ``os.environ`` has ``update`` set and the ``remove`` names unset; afterwards, as before."""
    env = os.environ
    touched = set(update) | set(remove)
    before = {name: env[name] for name in touched if name in env}
    try:
        env.update(update)
        for name in remove:
            env.pop(name, None)
        yield
    finally:
        for name in touched:
            env.pop(name, None)
        env.update(before)


def pytest_xdist_worker_id() -> int:
    """This pytest-xdist worker's number (``gw3`` -> 3), 0 without xdist."""
    return int(re.sub(r"^gw", "", os.environ.get("PYTEST_XDIST_WORKER", "gw0")))


def get_torch_dist_unique_port() -> int:
    """A ``--master_port`` for a launch that concurrent pytest-xdist workers do not share (29500 + worker id)."""
    return 29500 + pytest_xdist_worker_id()


class TempDirTestCase(unittest.TestCase):
    """One temporary directory, ``self.tmpdir``, for the whole class: emptied before each test (unless
    ``clear_on_setup`` is False) and removed after the last one."""

    clear_on_setup = True
    tmpdir: Path

    @classmethod
    def setUpClass(cls) -> None:
        """Create ``cls.tmpdir``."""
        cls.tmpdir = Path(tempfile.mkdtemp())

    @classmethod
    def tearDownClass(cls) -> None:
        """Remove ``cls.tmpdir``."""
        shutil.rmtree(cls.tmpdir, ignore_errors=True)

    def setUp(self) -> None:
        """Empty ``self.tmpdir`` (keeping the directory itself)."""
        if self.clear_on_setup:
            for path in self.tmpdir.iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()


def reset_process_state() -> None:
    """Forget the process-wide state: the current Accelerator's and ``PartialState``'s (the process group stays)."""
    AcceleratorState._reset_state(True)


class TrainerTestCase(unittest.TestCase):
    """A test case after each test of which the process-wide state is reset, so tests cannot see each other's."""

    def tearDown(self) -> None:
        """Reset the process state after the test."""
        super().tearDown()
        reset_process_state()


AccelerateTestCase = TrainerTestCase  # the upstream name


class MockingTestCase(unittest.TestCase):
    """A test case that starts mocks in ``setUp`` (call ``add_mocks`` after ``super().setUp()``) and stops them after
    each test: for mocks that need something only known once the class is set up."""

    mocks: list[Any]

    def add_mocks(self, mocks: Any | list[Any]) -> None:
        """Start ``mocks`` (one patcher or a list of them) now and stop them when the test ends."""
        self.mocks = list(mocks) if isinstance(mocks, (tuple, list)) else [mocks]
        for patcher in self.mocks:
            patcher.start()
            self.addCleanup(patcher.stop)


__all__ = [
    "DEFAULT_LAUNCH_COMMAND", "AccelerateTestCase", "MockingTestCase", "RunOutput", "SubprocessCallException",
    "TempDirTestCase", "TrainerTestCase", "are_the_same_tensors", "assert_exception", "capture_call_output",
    "device_count", "execute_subprocess_async", "get_launch_command", "get_torch_dist_unique_port", "memory_allocated_func",
    "mockenv_context", "path_in_accelerate_package", "path_in_trainer_package", "pytest_xdist_worker_id",
    "reset_process_state", "run_command", "torch_device",
    "parse_flag_from_env", "require_aim", "require_bnb", "require_clearml", "require_comet_ml", "require_cpu",
    "require_cuda", "require_cuda_or_hpu", "require_cuda_or_xpu", "require_datasets", "require_deepspeed",
    "require_dvclive", "require_fp16", "require_fp8", "require_fsdp2", "require_huggingface_suite",
    "require_import_timer", "require_matplotlib", "require_mlflow", "require_mlu", "require_mps",
    "require_multi_device", "require_multi_gpu", "require_multi_gpu_or_xpu", "require_multi_xpu", "require_musa",
    "require_neuron", "require_non_cpu", "require_non_hpu", "require_non_torch_xla", "require_non_xpu",
    "require_npu", "require_pandas", "require_pippy", "require_schedulefree", "require_sdaa",
    "require_single_device", "require_single_gpu", "require_single_xpu", "require_swanlab", "require_tensorboard",
    "require_timm", "require_torch_min_version", "require_torchao", "require_torchdata_stateful_dataloader",
    "require_torchvision", "require_tp", "require_tpu", "require_trackers", "require_trackio",
    "require_transformer_engine", "require_transformer_engine_mxfp8", "require_transformers", "require_triton",
    "require_wandb", "require_xpu", "run_first", "skip", "slow",
]
