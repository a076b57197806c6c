"""Decorators that skip a ``unittest``/pytest test (function or class) on a machine that lacks what it needs.

Each ``require_*`` decorator checks its condition once, when the test module is imported, and applies
``unittest.skipUnless``: the test runs only where the condition holds.
"""

from __future__ import annotations

import functools
import os
import unittest
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from trainer.test_utils.backend import (
    cuda_available,
    device_count,
    fp8_available,
    gpu_count,
    is_installed,
    torch_at_least,
    torch_device,
    tpu_available,
    xpu_available,
    xpu_count,
)

T = TypeVar("T", bound=Callable[..., Any])

_TRUTHY = {"y", "yes", "t", "true", "on", "1"}
_FALSY = {"n", "no", "f", "false", "off", "0"}


def parse_flag_from_env(key: str, default: bool = False) -> bool:
    """The yes/no value of environment variable ``key`` (``default`` when unset); anything else is an error."""
    value = os.environ.get(key)
    if value is None:
        return default
    if value.lower() in _TRUTHY:
        return True
    if value.lower() in _FALSY:
        return False
    raise ValueError(f"If set, {key} must be yes or no.")


def skip(test_case: T) -> T:
    """Skip the decorated test always."""
    return unittest.skip("Test was skipped")(test_case)


def slow(test_case: T) -> T:
    """Mark a slow test: skipped unless the environment variable ``RUN_SLOW`` is set to a true value."""
    return unittest.skipUnless(parse_flag_from_env("RUN_SLOW"), "test is slow")(test_case)


def run_first(test_case: T) -> T:
    """Order the test first (``pytest.mark.order(1)``, which the pytest-order plugin honours) where pytest is installed."""
    if not is_installed("pytest"):
        return test_case
    import pytest

    return cast(T, pytest.mark.order(1)(test_case))


def require_torch_min_version(test_case: Any = None, version: str | None = None) -> Any:
    """Skip the test unless torch is at least ``version``; usable bare or as ``@require_torch_min_version(version=...)``."""
    if test_case is None:
        return functools.partial(require_torch_min_version, version=version)
    if version is None:
        raise ValueError("require_torch_min_version needs version=, e.g. version='2.4.0'.")
    return unittest.skipUnless(torch_at_least(version), f"test requires torch version >= {version}")(test_case)


def _requirement(name: str, condition: Callable[[], bool], needs: str) -> Callable[[T], T]:
    def decorator(test_case: T) -> T:
        return unittest.skipUnless(condition(), f"test requires {needs}")(test_case)

    decorator.__name__ = decorator.__qualname__ = name
    decorator.__doc__ = f"Skip the decorated test unless this machine has {needs}."
    return decorator


def _hpu() -> bool:
    return torch_device == "hpu"


def _mxfp8() -> bool:
    if not is_installed("transformer_engine"):
        return False
    from transformer_engine.pytorch.fp8 import check_mxfp8_support

    return bool(check_mxfp8_support()[0])


def _transformers_at_least(minimum: str) -> bool:
    if not is_installed("transformers"):
        return False
    import transformers
    from torch.torch_version import TorchVersion

    return TorchVersion(transformers.__version__.split("+")[0]) >= minimum


def _trackers() -> bool:
    return any(is_installed(name) for name in ("wandb", "tensorboard", "tensorboardX", "trackio", "swanlab")) and \
        not is_installed("comet_ml")


require_cpu = _requirement("require_cpu", lambda: torch_device == "cpu", "only a CPU (no accelerator)")
require_non_cpu = _requirement("require_non_cpu", lambda: torch_device != "cpu", "a hardware accelerator")
require_cuda = _requirement("require_cuda", cuda_available, "a CUDA GPU (and no TorchXLA)")
require_cuda_or_hpu = _requirement("require_cuda_or_hpu", lambda: cuda_available() or _hpu(), "a CUDA GPU or an HPU")
require_xpu = _requirement("require_xpu", xpu_available, "an XPU")
require_cuda_or_xpu = _requirement("require_cuda_or_xpu", lambda: cuda_available() or xpu_available(),
                                   "a CUDA GPU or an XPU")
require_non_xpu = _requirement("require_non_xpu", lambda: torch_device != "xpu", "a device other than an XPU")
require_non_hpu = _requirement("require_non_hpu", lambda: not _hpu(), "a device other than an HPU")
require_fp16 = _requirement("require_fp16", lambda: True, "FP16 support")
require_fp8 = _requirement("require_fp8", fp8_available, "FP8 support (torchao, Transformer Engine or MS-AMP)")
require_fsdp2 = _requirement("require_fsdp2", lambda: torch_at_least("2.5.0"), "FSDP2 (torch >= 2.5.0)")
require_mlu = _requirement("require_mlu", lambda: torch_device == "mlu", "an MLU")
require_sdaa = _requirement("require_sdaa", lambda: torch_device == "sdaa", "an SDAA")
require_musa = _requirement("require_musa", lambda: torch_device == "musa", "a MUSA device")
require_npu = _requirement("require_npu", lambda: torch_device == "npu", "an NPU")
require_neuron = _requirement("require_neuron", lambda: torch_device == "neuron", "Neuron cores")
require_mps = _requirement("require_mps", lambda: torch.backends.mps.is_available(), "the `mps` backend")
require_tpu = _requirement("require_tpu", tpu_available, "a TPU")
require_non_torch_xla = _requirement("require_non_torch_xla", lambda: not is_installed("torch_xla"),
                                     "an environment without TorchXLA")
require_single_device = _requirement("require_single_device", lambda: torch_device != "cpu" and device_count == 1,
                                     "a single accelerator")
require_single_gpu = _requirement("require_single_gpu", lambda: gpu_count() == 1, "exactly one GPU")
require_single_xpu = _requirement("require_single_xpu", lambda: xpu_count() == 1, "exactly one XPU")
require_multi_device = _requirement("require_multi_device", lambda: device_count > 1, "several accelerators")
require_multi_gpu = _requirement("require_multi_gpu", lambda: gpu_count() > 1, "several GPUs")
require_multi_xpu = _requirement("require_multi_xpu", lambda: xpu_count() > 1, "several XPUs")
require_multi_gpu_or_xpu = _requirement(
    "require_multi_gpu_or_xpu", lambda: (cuda_available() or xpu_available()) and device_count > 1, "several GPUs or XPUs")
require_huggingface_suite = _requirement(
    "require_huggingface_suite", lambda: is_installed("transformers") and is_installed("datasets"),
    "the Hugging Face suite (transformers and datasets)")
require_tp = _requirement("require_tp", lambda: torch_at_least("2.3.0") and _transformers_at_least("4.52.0"),
                          "torch >= 2.3.0 and transformers >= 4.52.0")
require_pippy = _requirement("require_pippy", lambda: torch_at_least("2.4.0"), "pipeline parallelism (torch >= 2.4.0)")
require_transformer_engine_mxfp8 = _requirement("require_transformer_engine_mxfp8", _mxfp8,
                                                "Transformer Engine MXFP8 block scaling")
require_trackers = _requirement("require_trackers", _trackers,
                                "at least one of wandb, tensorboard, trackio or swanlab (and comet_ml not installed)")
require_tensorboard = _requirement("require_tensorboard", lambda: is_installed("tensorboard") or
                                   is_installed("tensorboardX"), "tensorboard")
require_torchdata_stateful_dataloader = _requirement(
    "require_torchdata_stateful_dataloader", lambda: is_installed("torchdata.stateful_dataloader"),
    "torchdata.stateful_dataloader")

def _package(key: str, package: str | None = None) -> Callable[[T], T]:
    """require_<key>: skip unless the package (named ``key`` unless given) is installed."""
    name = package or key
    return _requirement(f"require_{key}", lambda: is_installed(name), f"the {name} package")


require_datasets = _package("datasets")
require_transformers = _package("transformers")
require_timm = _package("timm")
require_torchvision = _package("torchvision")
require_triton = _package("triton")
require_schedulefree = _package("schedulefree")
require_bnb = _package("bnb", "bitsandbytes")
require_deepspeed = _package("deepspeed")
require_wandb = _package("wandb")
require_trackio = _package("trackio")
require_comet_ml = _package("comet_ml")
require_aim = _package("aim")
require_clearml = _package("clearml")
require_dvclive = _package("dvclive")
require_swanlab = _package("swanlab")
require_pandas = _package("pandas")
require_mlflow = _package("mlflow")
require_import_timer = _package("import_timer")
require_transformer_engine = _package("transformer_engine")
require_torchao = _package("torchao")
require_matplotlib = _package("matplotlib")
