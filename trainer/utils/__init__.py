"""``trainer.utils``: the names scripts written for Accelerate import from ``accelerate.utils``.

Thin aliases over the project's own classes (the strategies' options, the precision and
accumulation policies, ``PartialState``), never a second implementation.
"""

from trainer.random_state import set_seed
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
from trainer.utils.memory import find_executable_batch_size, release_memory, should_reduce_batch_size
from trainer.utils.operations import (
    CannotPadNestedTensorWarning,
    DistributedOperationException,
    broadcast,
    broadcast_object_list,
    concatenate,
    convert_outputs_to_fp32,
    convert_to_fp32,
    copy_tensor_to_devices,
    find_batch_size,
    find_device,
    gather,
    gather_object,
    get_data_structure,
    honor_type,
    ignorant_find_batch_size,
    initialize_tensors,
    is_namedtuple,
    is_tensor_information,
    is_torch_tensor,
    listify,
    pad_across_processes,
    pad_input_tensors,
    recursively_apply,
    reduce,
    send_to_device,
    slice_tensors,
)

__all__ = [
    "AutocastKwargs", "ComputeEnvironment", "CustomDtype", "DDPCommunicationHookType", "DataLoaderConfiguration",
    "DeepSpeedPlugin", "DistributedDataParallelKwargs", "DistributedType", "DynamoBackend", "FullyShardedDataParallelPlugin",
    "GradScalerKwargs", "GradientAccumulationPlugin", "InitProcessGroupKwargs", "KwargsHandler", "LoggerType",
    "MegatronLMPlugin", "PrecisionType", "ProjectConfiguration", "RNGType", "SageMakerDistributedType",
    "CannotPadNestedTensorWarning", "DistributedOperationException", "broadcast", "broadcast_object_list", "concatenate",
    "convert_outputs_to_fp32", "convert_to_fp32", "copy_tensor_to_devices", "find_batch_size", "find_device",
    "find_executable_batch_size", "gather", "gather_object", "get_data_structure", "honor_type", "ignorant_find_batch_size",
    "initialize_tensors", "is_namedtuple", "is_tensor_information", "is_torch_tensor", "listify", "pad_across_processes",
    "pad_input_tensors", "recursively_apply", "reduce", "release_memory", "send_to_device", "set_seed",
    "should_reduce_batch_size", "slice_tensors",
]
