"""Names of ``accelerate.utils`` that cannot mean the same here: importable, and one clear error when used.

Each entry says what to use instead. Most are the internals of an integration that a strategy owns
here (the DeepSpeed engine, Megatron's training steps, FSDP's state-dict calls), launcher internals
that ``trainer launch`` replaces, or features of packages the project does not drive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NoReturn

_DEEPSPEED = ("the DeepSpeed strategy owns the engine: use Accelerator(deepspeed_plugin=DeepSpeedPlugin(...)) or "
              "strategy='deepspeed', and accelerator.prepare(...)")
_MEGATRON = ("the Megatron strategy owns its model, optimizer and schedule: use Accelerator(megatron_lm_plugin="
             "MegatronLMPlugin(...)) or strategy='megatron' and accelerator.prepare(...)")
_FSDP = ("the FSDP strategy saves and loads its own state: use accelerator.save_state()/load_state() and "
         "accelerator.get_state_dict(model); merge sharded checkpoints with `trainer merge-weights`")
_LAUNCH = "trainer launch builds the processes' commands and environment; run `trainer launch --help`"
_FP8 = "fp8 training goes through torchao here: use Accelerator(mixed_precision='fp8')"
_BNB = "quantized loading: use trainer.inference.QuantizationConfig with load_checkpoint_and_dispatch(..., quantization=)"
_OFFLOAD = ("offloading is the Inferencer's job here: use load_checkpoint_and_dispatch(model, checkpoint, device_map=..., "
            "offload_folder=...), cpu_offload(model) or disk_offload(model, folder)")
_PARALLEL = "tensor, data and context parallel sizes go in ParallelismConfig (Accelerator(parallelism_config=...))"

REASONS: dict[str, str] = {
    **dict.fromkeys(["DeepSpeedEngineWrapper", "DeepSpeedOptimizerWrapper", "DeepSpeedSchedulerWrapper",
                     "HfDeepSpeedConfig", "DeepSpeedSequenceParallelConfig", "get_active_deepspeed_plugin",
                     "map_pytorch_optim_to_deepspeed", "deepspeed_required", "compile_regions_deepspeed"], _DEEPSPEED),
    "GatheredParameters": "use deepspeed.zero.GatheredParameters from the deepspeed package itself",
    **dict.fromkeys(["AbstractTrainStep", "BertTrainStep", "GPTTrainStep", "T5TrainStep", "MegatronEngine",
                     "MegatronLMDummyDataLoader", "MegatronLMDummyScheduler", "MegatronLMOptimizerWrapper",
                     "MegatronLMSchedulerWrapper", "add_model_config_to_megatron_parser",
                     "avg_losses_across_data_parallel_group", "gather_across_data_parallel_groups",
                     "megatron_lm_initialize", "megatron_lm_prepare_data_loader",
                     "megatron_lm_prepare_model_optimizer_scheduler", "megatron_lm_prepare_optimizer",
                     "megatron_lm_prepare_scheduler"], _MEGATRON),
    **dict.fromkeys(["load_fsdp_model", "load_fsdp_optimizer", "save_fsdp_model", "save_fsdp_optimizer",
                     "fsdp2_apply_ac", "fsdp2_canonicalize_names", "fsdp2_load_full_state_dict", "fsdp2_prepare_model",
                     "fsdp2_switch_optimizer_parameters", "get_fsdp2_grad_scaler", "compile_regions_fsdp2",
                     "disable_fsdp_ram_efficient_loading", "enable_fsdp_ram_efficient_loading"], _FSDP),
    "merge_fsdp_weights": "run `trainer merge-weights CHECKPOINT OUTPUT` (or trainer.cli.merge_weights)",
    **dict.fromkeys(["PrepareForLaunch", "prepare_deepspeed_cmd_env", "prepare_multi_gpu_env",
                     "prepare_sagemager_args_inputs", "prepare_simple_launcher_cmd_env", "prepare_tpu",
                     "_filter_args", "are_libraries_initialized", "install_xla", "set_numa_affinity"], _LAUNCH),
    **dict.fromkeys(["FP8RecipeKwargs", "AORecipeKwargs", "TERecipeKwargs", "MSAMPRecipeKwargs", "apply_fp8_autowrap",
                     "contextual_fp8_autocast", "convert_model", "convert_model_to_fp8_ao", "has_ao_layers",
                     "has_transformer_engine_layers", "filter_first_and_last_linear_layers", "torchao_required",
                     "check_cuda_fp8_capability"], _FP8),
    **dict.fromkeys(["BnbQuantizationConfig", "load_and_quantize_model", "has_4bit_bnb_layers"], _BNB),
    **dict.fromkeys(["OffloadedWeightsLoader", "PrefixedDataset", "offload_weight", "load_offloaded_weight",
                     "load_offloaded_weights", "save_offload_index", "offload_state_dict", "align_module_device",
                     "has_offloaded_params", "extract_submodules_state_dict", "get_balanced_memory",
                     "get_max_layer_size", "calculate_maximum_sizes", "check_tied_parameters_in_config",
                     "check_tied_parameters_on_same_device", "retie_parameters", "ensure_weights_retied",
                     "get_module_children_bottom_up"], _OFFLOAD),
    **dict.fromkeys(["TorchTensorParallelPlugin", "TorchTensorParallelConfig", "TorchContextParallelConfig",
                     "model_has_dtensor"], _PARALLEL),
    "cpu_offload_with_hook": ("hooks that move a model back and forth between pipeline steps are not available; "
                              "use cpu_offload(model) (weights stream to the device per forward)"),
    "compile_regions": "compile the model with Accelerator(dynamo_backend=...) or torch.compile(model)",
    "check_cuda_p2p_ib_support": "not needed: torch.distributed picks the transport itself",
    "get_gpu_info": "use torch.accelerator.device_count() and torch.cuda.get_device_name()",
}


def unavailable(name: str) -> type:
    """A class named ``name`` whose construction or call raises the reason it is not available."""
    reason = REASONS[name]

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"trainer.utils.{name} is not available here: {reason}.")

    return type(name, (), {"__init__": refuse, "__doc__": f"Not available: {reason}.",
                           "__module__": "trainer.utils"})


def refusing_getattr(module: str, names: Iterable[str] | None = None) -> Callable[[str], type]:
    """A module ``__getattr__`` that answers ``names`` (default: every name above) with a refusing class."""
    allowed = set(REASONS if names is None else names)

    def __getattr__(name: str) -> type:
        if name in allowed and name in REASONS:
            return unavailable(name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
