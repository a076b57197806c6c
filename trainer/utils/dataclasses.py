"""``trainer.utils.dataclasses``: Accelerate's enums, kwargs handlers, configurations and plugins, at its module path.

The classes live in ``trainer.utils.enums``, ``kwargs_handlers``, ``configurations`` and ``plugins``.
"""

from trainer.utils.configurations import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration
from trainer.utils.enums import (
    BaseEnum,
    ComputeEnvironment,
    CustomDtype,
    DDPCommunicationHookType,
    DistributedType,
    DynamoBackend,
    EnumWithContains,
    FP8BackendType,
    LoggerType,
    PrecisionType,
    RNGType,
    SageMakerDistributedType,
)
from trainer.utils.kwargs_handlers import (
    AutocastKwargs,
    DistributedDataParallelKwargs,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    KwargsHandler,
)
from trainer.utils.plugins import DeepSpeedPlugin, FullyShardedDataParallelPlugin, MegatronLMPlugin

__all__ = [
    "AutocastKwargs", "BaseEnum", "ComputeEnvironment", "CustomDtype", "DDPCommunicationHookType", "DataLoaderConfiguration",
    "DeepSpeedPlugin", "DistributedDataParallelKwargs", "DistributedType", "DynamoBackend", "EnumWithContains", "FP8BackendType",
    "FullyShardedDataParallelPlugin", "GradScalerKwargs", "GradientAccumulationPlugin", "InitProcessGroupKwargs",
    "KwargsHandler", "LoggerType", "MegatronLMPlugin", "PrecisionType", "ProjectConfiguration", "RNGType",
    "SageMakerDistributedType",
]
