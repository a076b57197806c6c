"""``trainer.utils``: the names scripts written for Accelerate import from ``accelerate.utils``.

Thin aliases over the project's own classes (the strategies' options, the precision and
accumulation policies, ``PartialState``), never a second implementation.
"""

from trainer.parallelism import ParallelismConfig
from trainer.random_state import set_seed
from trainer.utils import availability as _availability
from trainer.utils.availability import *  # noqa: F403 - the is_*_available functions
from trainer.utils.constants import (
    MITA_PROFILING_AVAILABLE_PYTORCH_VERSION,
    MODEL_NAME,
    OPTIMIZER_NAME,
    PROFILE_PATTERN_NAME,
    RNG_STATE_NAME,
    SAFE_MODEL_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_PATTERN_NAME,
    SAMPLER_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
    TORCH_DISTRIBUTED_OPERATION_TYPES,
    TORCH_LAUNCH_PARAMS,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_PATTERN_NAME,
    XPU_PROFILING_AVAILABLE_PYTORCH_VERSION,
)
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
    FP8BackendType,
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
from trainer.utils.dummies import DummyOptim, DummyScheduler  # noqa: E402 - after the names it builds on
from trainer.utils.dynamo import TorchDynamoPlugin
from trainer.utils.environment import (
    check_os_kernel,
    clear_environment,
    convert_dict_to_env_variables,
    get_accelerator_free_memory,
    get_cpu_distributed_information,
    get_current_device_type,
    get_distributed_backend,
    get_int_from_env,
    get_torch_accelerator_backend,
    parse_choice_from_env,
    parse_flag_from_env,
    patch_environment,
    purge_accelerate_environment,
    str_to_bool,
)
from trainer.utils.kwargs_handlers import ProfileKwargs
from trainer.utils.memory import find_executable_batch_size, release_memory, should_reduce_batch_size
from trainer.utils.modeling import (
    check_device_map,
    compute_module_sizes,
    convert_file_size_to_int,
    dtype_byte_size,
    find_tied_parameters,
    get_max_memory,
    get_model_tp_size,
    infer_auto_device_map,
    load_checkpoint_in_model,
    load_state_dict,
    named_module_tensors,
    normalize_device,
    set_module_tensor_to_device,
)
from trainer.utils.operations import (
    CannotPadNestedTensorWarning,
    DistributedOperationException,
    TensorInformation,
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
from trainer.utils.other import (
    clean_state_dict_for_safetensors,
    convert_bytes,
    extract_model_from_parallel,
    get_grad_scaler,
    get_mixed_precision_context_manager,
    get_pretty_name,
    has_compiled_regions,
    id_tensor_storage,
    is_compiled_module,
    is_peft_model,
    load,
    merge_dicts,
    recursive_getattr,
    save,
    tqdm,
    wait_for_everyone,
    write_basic_config,
)
from trainer.utils.random import synchronize_rng_state, synchronize_rng_states
from trainer.utils.unavailable import refusing_getattr

# Accelerate's names that cannot mean the same here: importable, refusing with the reason when used.
__getattr__ = refusing_getattr("trainer.utils")


__all__ = [
    "AutocastKwargs", "ComputeEnvironment", "CustomDtype", "DDPCommunicationHookType", "DataLoaderConfiguration",
    "DeepSpeedPlugin", "DistributedDataParallelKwargs", "DistributedType", "DynamoBackend", "FullyShardedDataParallelPlugin",
    "FP8BackendType",
    "GradScalerKwargs", "GradientAccumulationPlugin", "InitProcessGroupKwargs", "KwargsHandler", "LoggerType",
    "ParallelismConfig",
    "MegatronLMPlugin", "PrecisionType", "ProjectConfiguration", "RNGType", "SageMakerDistributedType",
    "CannotPadNestedTensorWarning", "DistributedOperationException", "broadcast", "broadcast_object_list", "concatenate",
    "convert_outputs_to_fp32", "convert_to_fp32", "copy_tensor_to_devices", "find_batch_size", "find_device",
    "find_executable_batch_size", "gather", "gather_object", "get_data_structure", "honor_type", "ignorant_find_batch_size",
    "initialize_tensors", "is_namedtuple", "is_tensor_information", "is_torch_tensor", "listify", "pad_across_processes",
    "pad_input_tensors", "recursively_apply", "reduce", "release_memory", "send_to_device", "set_seed",
    "should_reduce_batch_size", "slice_tensors",

    "DummyOptim", "DummyScheduler", "ProfileKwargs", "TorchDynamoPlugin", "TensorInformation", "check_device_map",
    "check_os_kernel",
    "clean_state_dict_for_safetensors", "clear_environment", "compute_module_sizes", "convert_bytes",
    "convert_dict_to_env_variables", "convert_file_size_to_int", "dtype_byte_size", "extract_model_from_parallel",
    "find_tied_parameters", "get_cpu_distributed_information", "get_current_device_type", "get_grad_scaler",
    "get_int_from_env", "get_max_memory", "get_mixed_precision_context_manager", "get_pretty_name",
    "has_compiled_regions", "id_tensor_storage", "infer_auto_device_map", "is_compiled_module", "is_peft_model", "load",
    "load_checkpoint_in_model", "load_state_dict", "merge_dicts", "named_module_tensors", "parse_choice_from_env",
    "parse_flag_from_env",
    "patch_environment", "purge_accelerate_environment", "recursive_getattr", "save", "set_module_tensor_to_device",
    "str_to_bool", "synchronize_rng_state", "synchronize_rng_states", "tqdm", "wait_for_everyone",
    "write_basic_config", "get_accelerator_free_memory", "get_distributed_backend", "get_model_tp_size",
    "get_torch_accelerator_backend", "normalize_device", "MITA_PROFILING_AVAILABLE_PYTORCH_VERSION", "MODEL_NAME",
    "OPTIMIZER_NAME",
    "PROFILE_PATTERN_NAME", "RNG_STATE_NAME", "SAFE_MODEL_NAME", "SAFE_WEIGHTS_INDEX_NAME", "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_PATTERN_NAME", "SAMPLER_NAME", "SCALER_NAME", "SCHEDULER_NAME", "TORCH_DISTRIBUTED_OPERATION_TYPES",
    "TORCH_LAUNCH_PARAMS", "WEIGHTS_INDEX_NAME", "WEIGHTS_NAME", "WEIGHTS_PATTERN_NAME",
    "XPU_PROFILING_AVAILABLE_PYTORCH_VERSION",
    *(name for name in dir(_availability) if name.startswith("is_") or name == "compare_versions"),
]
