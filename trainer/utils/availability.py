"""``is_*_available``: whether a package, a device or a feature can be used here (Accelerate's names).

A package counts as available when it can be imported; nothing is imported to answer. Devices ask
torch. The answers describe this machine; whether the project can use the thing is a separate
question the strategies, precisions and trackers answer when they are chosen.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import operator
import socket
from typing import Any

import torch
from packaging import version

_OPERATIONS = {">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<=": operator.le,
               "<": operator.lt}


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or a broken one
        return False


def compare_versions(library_or_version: str | version.Version, operation: str, requirement_version: str) -> bool:
    """Compare an installed library's version (or a version) with ``requirement_version`` by ``operation``."""
    if operation not in _OPERATIONS:
        raise ValueError(f"compare_versions: operation must be one of {list(_OPERATIONS)}, got {operation!r}.")
    if isinstance(library_or_version, str):
        library_or_version = version.parse(importlib.metadata.version(library_or_version))
    return bool(_OPERATIONS[operation](library_or_version, version.parse(requirement_version)))


def is_torch_version(operation: str, requirement_version: str) -> bool:
    """Compare the installed torch's version (without its local part, e.g. ``+cpu``) with a version."""
    return compare_versions(version.parse(version.parse(torch.__version__).base_version), operation, requirement_version)


def _package(module: str) -> Any:
    def check(*args: Any, **kwargs: Any) -> bool:
        return _importable(module)

    check.__name__ = f"is_{module.split('.')[0]}_available"
    check.__doc__ = f"True when ``{module}`` can be imported."
    return check


is_aim_available = _package("aim")
is_amdsmi_available = _package("amdsmi")
is_boto3_available = _package("boto3")
is_clearml_available = _package("clearml")
is_comet_ml_available = _package("comet_ml")
is_datasets_available = _package("datasets")
is_deepspeed_available = _package("deepspeed")
is_dvclive_available = _package("dvclive")
is_import_timer_available = _package("import_timer")
is_lomo_available = _package("lomo_optim")
is_matplotlib_available = _package("matplotlib")
is_megatron_lm_available = _package("megatron.core")
is_mlflow_available = _package("mlflow")
is_msamp_available = _package("msamp")
is_pandas_available = _package("pandas")
is_peft_available = _package("peft")
is_pynvml_available = _package("pynvml")
is_pytest_available = _package("pytest")
is_rich_available = _package("rich")
is_sagemaker_available = _package("sagemaker")
is_schedulefree_available = _package("schedulefree")
is_swanlab_available = _package("swanlab")
is_tensorboard_available = _package("tensorboard")
is_timm_available = _package("timm")
is_torchao_available = _package("torchao")
is_torchdata_available = _package("torchdata")
is_torchvision_available = _package("torchvision")
is_trackio_available = _package("trackio")
is_transformer_engine_available = _package("transformer_engine")
is_transformers_available = _package("transformers")
is_triton_available = _package("triton")
is_wandb_available = _package("wandb")
is_bnb_available = _package("bitsandbytes")
is_4bit_bnb_available = _package("bitsandbytes")
is_8bit_bnb_available = _package("bitsandbytes")


def is_torchdata_stateful_dataloader_available() -> bool:
    return _importable("torchdata.stateful_dataloader")


def is_bitsandbytes_multi_backend_available() -> bool:
    return _importable("bitsandbytes.backends")


def is_transformer_engine_mxfp8_available() -> bool:
    return False  # needs Transformer Engine, which this project does not drive


def is_pippy_available() -> bool:
    """Pipeline parallelism comes with torch (``torch.distributed.pipelining``)."""
    return _importable("torch.distributed.pipelining")


def is_weights_only_available() -> bool:
    return is_torch_version(">=", "2.4.0")


def is_torch_xla_available(check_is_tpu: bool = False, check_is_gpu: bool = False) -> bool:
    return _importable("torch_xla")


def is_cuda_available() -> bool:
    return torch.cuda.is_available()


def is_rocm_available() -> bool:
    return torch.version.hip is not None and torch.cuda.is_available()


def is_mps_available(min_version: str = "1.12") -> bool:
    return torch.backends.mps.is_available()


def is_xpu_available(check_device: bool = False) -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def is_xccl_available() -> bool:
    return bool(torch.distributed.is_available() and getattr(torch.distributed, "is_xccl_available", lambda: False)())


def _extension_device(module: str, attribute: str) -> bool:
    if not _importable(module):
        return False
    backend = getattr(torch, attribute, None)
    return bool(backend is not None and backend.is_available())


def is_npu_available(check_device: bool = False) -> bool:
    return _extension_device("torch_npu", "npu")


def is_mlu_available(check_device: bool = False) -> bool:
    return _extension_device("torch_mlu", "mlu")


def is_musa_available(check_device: bool = False) -> bool:
    return _extension_device("torch_musa", "musa")


def is_sdaa_available(check_device: bool = False) -> bool:
    return _extension_device("torch_sdaa", "sdaa")


def is_hpu_available(init_hccl: bool = False) -> bool:
    return _extension_device("habana_frameworks", "hpu")


def is_habana_gaudi1() -> bool:
    return False  # only true on Gaudi 1 machines, which need habana_frameworks' device query


def is_neuron_available() -> bool:
    return _extension_device("torch_neuronx", "neuron")


def is_bf16_available(ignore_tpu: bool = False) -> bool:
    """bf16 works on the CPU and on CUDA devices that support it."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True


def is_fp16_available() -> bool:
    return not is_habana_gaudi1()


def is_fp8_available() -> bool:
    """fp8 training here goes through torchao (``mixed_precision="fp8"``)."""
    return is_torchao_available()


def is_port_in_use(port: int | None = None) -> bool:
    """True when something listens on ``localhost:port`` (default 29500, torch.distributed's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("localhost", 29500 if port is None else port)) == 0
