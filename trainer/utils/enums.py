"""The enumerations Accelerate scripts compare against, as ``str`` enums.

Each member is its own value as a string, so ``accelerator.distributed_type == DistributedType.MULTI_CPU``
and ``accelerator.distributed_type == "MULTI_CPU"`` both hold, members serialise to JSON as
strings, and ``"fp16" in PrecisionType`` asks whether a value is one of them. The values are the
project's own vocabulary too: the launch configuration's ``distributed_type`` values are the
strategies' (``tests/test_accelerate_names.py`` holds the two equal), the precision values are the
precision table's names.
"""

from __future__ import annotations

import enum
from typing import Any


class EnumWithContains(enum.EnumMeta):
    """``value in SomeEnum`` is True when ``value`` is one of the members' values (or a member)."""

    def __contains__(cls, item: Any) -> bool:
        try:
            cls(item)
        except ValueError:
            return False
        return True


class BaseEnum(enum.Enum, metaclass=EnumWithContains):
    """An enum whose ``str()`` is its value, with ``list()`` of every value."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def list(cls) -> list[str]:
        """Every member's value, in order."""
        return [str(member) for member in cls]


class DistributedType(str, BaseEnum):
    """How the processes of a run share the work (``accelerator.distributed_type``, the YAML ``distributed_type``)."""

    NO = "NO"
    MULTI_CPU = "MULTI_CPU"
    MULTI_GPU = "MULTI_GPU"
    MULTI_NPU = "MULTI_NPU"
    MULTI_MLU = "MULTI_MLU"
    MULTI_SDAA = "MULTI_SDAA"
    MULTI_MUSA = "MULTI_MUSA"
    MULTI_XPU = "MULTI_XPU"
    DEEPSPEED = "DEEPSPEED"
    FSDP = "FSDP"
    XLA = "XLA"
    MEGATRON_LM = "MEGATRON_LM"
    MULTI_HPU = "MULTI_HPU"
    MULTI_NEURON = "MULTI_NEURON"


def as_distributed_type(kind: str) -> DistributedType | str:
    """``kind`` as a ``DistributedType`` member, or as it is when it is a registered strategy's own name."""
    return DistributedType(kind) if kind in DistributedType else kind


class SageMakerDistributedType(str, BaseEnum):
    """SageMaker's distribution kinds (accepted in configurations written for Accelerate; not launched here)."""

    NO = "NO"
    DATA_PARALLEL = "DATA_PARALLEL"
    MODEL_PARALLEL = "MODEL_PARALLEL"


class ComputeEnvironment(str, BaseEnum):
    """Where a run executes (the YAML ``compute_environment``)."""

    LOCAL_MACHINE = "LOCAL_MACHINE"
    AMAZON_SAGEMAKER = "AMAZON_SAGEMAKER"


class DynamoBackend(str, BaseEnum):
    """A ``torch.compile`` backend (the YAML ``dynamo_config.dynamo_backend``); ``NO`` compiles nothing."""

    NO = "NO"
    EAGER = "EAGER"
    AOT_EAGER = "AOT_EAGER"
    INDUCTOR = "INDUCTOR"
    AOT_TS_NVFUSER = "AOT_TS_NVFUSER"
    NVPRIMS_NVFUSER = "NVPRIMS_NVFUSER"
    CUDAGRAPHS = "CUDAGRAPHS"
    OFI = "OFI"
    FX2TRT = "FX2TRT"
    ONNXRT = "ONNXRT"
    TENSORRT = "TENSORRT"
    AOT_TORCHXLA_TRACE_ONCE = "AOT_TORCHXLA_TRACE_ONCE"
    TORCHXLA_TRACE_ONCE = "TORCHXLA_TRACE_ONCE"
    TVM = "TVM"
    HPU_BACKEND = "HPU_BACKEND"
    NEURON = "NEURON"


class LoggerType(BaseEnum):
    """An experiment tracker, as ``log_with`` takes it (``LoggerType.MLFLOW`` means ``"mlflow"``)."""

    ALL = "all"
    AIM = "aim"
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"
    TRACKIO = "trackio"
    COMETML = "comet_ml"
    MLFLOW = "mlflow"
    CLEARML = "clearml"
    DVCLIVE = "dvclive"
    SWANLAB = "swanlab"


class PrecisionType(str, BaseEnum):
    """A precision, as ``mixed_precision`` takes it (the canonical names of ``trainer.precision.names``)."""

    NO = "no"
    FP8 = "fp8"
    FP16 = "fp16"
    BF16 = "bf16"


class FP8BackendType(str, BaseEnum):
    """Which library runs fp8 matmuls (``accelerator.fp8_backend``): torchao (``AO``), TransformerEngine (``TE``), or none."""

    NO = "NO"
    TE = "TE"
    MSAMP = "MSAMP"
    AO = "AO"


class RNGType(BaseEnum):
    """A random number generator that ``synchronize_rng_states`` can align across processes."""

    TORCH = "torch"
    CUDA = "cuda"
    MLU = "mlu"
    SDAA = "sdaa"
    MUSA = "musa"
    NPU = "npu"
    XLA = "xla"
    XPU = "xpu"
    HPU = "hpu"
    NEURON = "neuron"
    GENERATOR = "generator"


class CustomDtype(enum.Enum):
    """Sizes ``infer_auto_device_map`` can plan for beyond torch's dtypes."""

    FP8 = "fp8"
    INT4 = "int4"
    INT2 = "int2"


class DDPCommunicationHookType(BaseEnum):
    """How DDP compresses gradients for its all-reduce (``DistributedDataParallelKwargs(comm_hook=...)``)."""

    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"
    POWER_SGD = "power_sgd"
    BATCHED_POWER_SGD = "batched_power_sgd"
