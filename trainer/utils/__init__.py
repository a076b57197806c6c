"""``trainer.utils``: the names scripts written for Accelerate import from ``accelerate.utils``.

Thin aliases over the project's own classes (the strategies' options, the precision and
accumulation policies, ``PartialState``), never a second implementation.
"""

from trainer.utils.dataclasses import (
    AutocastKwargs,
    ComputeEnvironment,
    CustomDtype,
    DataLoaderConfiguration,
    DDPCommunicationHookType,
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    DynamoBackend,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    KwargsHandler,
    LoggerType,
    MegatronLMPlugin,
    PrecisionType,
    ProjectConfiguration,
    RNGType,
    SageMakerDistributedType,
)

__all__ = [
    "AutocastKwargs", "ComputeEnvironment", "CustomDtype", "DDPCommunicationHookType", "DataLoaderConfiguration",
    "DeepSpeedPlugin", "DistributedDataParallelKwargs", "DistributedType", "DynamoBackend", "FullyShardedDataParallelPlugin",
    "GradScalerKwargs", "GradientAccumulationPlugin", "InitProcessGroupKwargs", "KwargsHandler", "LoggerType",
    "MegatronLMPlugin", "PrecisionType", "ProjectConfiguration", "RNGType", "SageMakerDistributedType",
]
