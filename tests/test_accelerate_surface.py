"""Accelerate's public names under the trainer paths, and the pieces of its surface added for them.

The two lists are the exports of Accelerate's ``accelerate/__init__.py`` and ``accelerate/utils/__init__.py``
(``rich``, which Accelerate exports only when the ``rich`` package is installed and which installs rich
tracebacks on import, is left out on purpose). Each name must import from the mirrored path; a name
that cannot mean the same here must refuse, when used, with what to use instead.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_cli
from torch.utils.data import DataLoader

import trainer
import trainer.utils
from trainer import Accelerator
from trainer.utils.unavailable import REASONS

ACCELERATE_TOP_LEVEL = str.split("""
    Accelerator AutocastKwargs DDPCommunicationHookType DataLoaderConfiguration DeepSpeedPlugin
    DistributedDataParallelKwargs DistributedType FullyShardedDataParallelPlugin GradScalerKwargs
    InitProcessGroupKwargs ParallelismConfig PartialState ProfileKwargs cpu_offload cpu_offload_with_hook
    debug_launcher disk_offload dispatch_model find_executable_batch_size infer_auto_device_map
    init_empty_weights init_on_device is_rich_available load_checkpoint_and_dispatch load_checkpoint_in_model
    notebook_launcher prepare_pippy skip_first_batches synchronize_rng_states
""")

ACCELERATE_UTILS = str.split("""
    AORecipeKwargs AbstractTrainStep AutocastKwargs BertTrainStep BnbQuantizationConfig
    CannotPadNestedTensorWarning ComputeEnvironment CustomDtype DDPCommunicationHookType DataLoaderConfiguration
    DeepSpeedEngineWrapper DeepSpeedOptimizerWrapper DeepSpeedPlugin DeepSpeedSchedulerWrapper
    DeepSpeedSequenceParallelConfig DistributedDataParallelKwargs DistributedType DummyOptim DummyScheduler
    DynamoBackend FP8RecipeKwargs FullyShardedDataParallelPlugin GPTTrainStep GatheredParameters
    GradScalerKwargs GradientAccumulationPlugin HfDeepSpeedConfig InitProcessGroupKwargs KwargsHandler
    LoggerType MITA_PROFILING_AVAILABLE_PYTORCH_VERSION MODEL_NAME MSAMPRecipeKwargs MegatronEngine
    MegatronLMDummyDataLoader MegatronLMDummyScheduler MegatronLMOptimizerWrapper MegatronLMPlugin
    MegatronLMSchedulerWrapper OPTIMIZER_NAME OffloadedWeightsLoader PROFILE_PATTERN_NAME ParallelismConfig
    PrecisionType PrefixedDataset PrepareForLaunch ProfileKwargs ProjectConfiguration RNGType RNG_STATE_NAME
    SAFE_MODEL_NAME SAFE_WEIGHTS_INDEX_NAME SAFE_WEIGHTS_NAME SAFE_WEIGHTS_PATTERN_NAME SAMPLER_NAME SCALER_NAME
    SCHEDULER_NAME SageMakerDistributedType T5TrainStep TERecipeKwargs TORCH_DISTRIBUTED_OPERATION_TYPES
    TORCH_LAUNCH_PARAMS TensorInformation TorchContextParallelConfig TorchDynamoPlugin TorchTensorParallelConfig
    TorchTensorParallelPlugin WEIGHTS_INDEX_NAME WEIGHTS_NAME WEIGHTS_PATTERN_NAME
    XPU_PROFILING_AVAILABLE_PYTORCH_VERSION _filter_args add_model_config_to_megatron_parser align_module_device
    apply_fp8_autowrap are_libraries_initialized avg_losses_across_data_parallel_group broadcast
    broadcast_object_list calculate_maximum_sizes check_cuda_fp8_capability check_cuda_p2p_ib_support
    check_device_map check_os_kernel check_tied_parameters_in_config check_tied_parameters_on_same_device
    clean_state_dict_for_safetensors clear_environment compare_versions compile_regions
    compile_regions_deepspeed compile_regions_fsdp2 compute_module_sizes concatenate contextual_fp8_autocast
    convert_bytes convert_dict_to_env_variables convert_file_size_to_int convert_model convert_model_to_fp8_ao
    convert_outputs_to_fp32 convert_to_fp32 copy_tensor_to_devices deepspeed_required
    disable_fsdp_ram_efficient_loading dtype_byte_size enable_fsdp_ram_efficient_loading ensure_weights_retied
    extract_model_from_parallel extract_submodules_state_dict filter_first_and_last_linear_layers
    find_batch_size find_device find_executable_batch_size find_tied_parameters fsdp2_apply_ac
    fsdp2_canonicalize_names fsdp2_load_full_state_dict fsdp2_prepare_model fsdp2_switch_optimizer_parameters
    gather gather_across_data_parallel_groups gather_object get_active_deepspeed_plugin get_balanced_memory
    get_accelerator_free_memory get_cpu_distributed_information get_current_device_type get_data_structure
    get_distributed_backend get_fsdp2_grad_scaler get_model_tp_size get_torch_accelerator_backend normalize_device
    get_gpu_info get_grad_scaler get_int_from_env get_max_layer_size get_max_memory
    get_mixed_precision_context_manager get_module_children_bottom_up get_pretty_name has_4bit_bnb_layers
    has_ao_layers has_compiled_regions has_offloaded_params has_transformer_engine_layers honor_type
    id_tensor_storage ignorant_find_batch_size infer_auto_device_map initialize_tensors install_xla
    is_4bit_bnb_available is_8bit_bnb_available is_aim_available is_amdsmi_available is_bf16_available
    is_bitsandbytes_multi_backend_available is_bnb_available is_boto3_available is_clearml_available
    is_comet_ml_available is_compiled_module is_cuda_available is_datasets_available is_deepspeed_available
    is_dvclive_available is_fp16_available is_fp8_available is_habana_gaudi1 is_hpu_available
    is_import_timer_available is_lomo_available is_matplotlib_available is_megatron_lm_available
    is_mlflow_available is_mlu_available is_mps_available is_msamp_available is_musa_available is_namedtuple
    is_neuron_available is_npu_available is_pandas_available is_peft_available is_peft_model is_pippy_available
    is_port_in_use is_pynvml_available is_pytest_available is_rich_available is_rocm_available
    is_sagemaker_available is_schedulefree_available is_sdaa_available is_swanlab_available
    is_tensor_information is_tensorboard_available is_timm_available is_torch_tensor is_torch_version
    is_torch_xla_available is_torchao_available is_torchdata_available
    is_torchdata_stateful_dataloader_available is_torchvision_available is_trackio_available
    is_transformer_engine_available is_transformer_engine_mxfp8_available is_transformers_available
    is_triton_available is_wandb_available is_weights_only_available is_xccl_available is_xpu_available listify
    load load_and_quantize_model load_checkpoint_in_model load_fsdp_model load_fsdp_optimizer
    load_offloaded_weight load_offloaded_weights load_state_dict map_pytorch_optim_to_deepspeed
    megatron_lm_initialize megatron_lm_prepare_data_loader megatron_lm_prepare_model_optimizer_scheduler
    megatron_lm_prepare_optimizer megatron_lm_prepare_scheduler merge_dicts merge_fsdp_weights model_has_dtensor
    named_module_tensors offload_state_dict offload_weight pad_across_processes pad_input_tensors
    parse_choice_from_env parse_flag_from_env patch_environment prepare_deepspeed_cmd_env prepare_multi_gpu_env
    prepare_sagemager_args_inputs prepare_simple_launcher_cmd_env prepare_tpu purge_accelerate_environment
    recursive_getattr recursively_apply reduce release_memory retie_parameters save save_fsdp_model
    save_fsdp_optimizer save_offload_index send_to_device set_module_tensor_to_device set_numa_affinity set_seed
    slice_tensors str_to_bool synchronize_rng_state synchronize_rng_states torchao_required tqdm
    wait_for_everyone write_basic_config
""")

MODULE_PATHS = {
    "trainer.state": ["AcceleratorState", "GradientState", "PartialState"],
    "trainer.accelerator": ["Accelerator", "DataLoaderConfiguration", "GradientAccumulationPlugin"],
    "trainer.data_loader": ["prepare_data_loader", "skip_first_batches", "SeedableRandomSampler", "BatchSamplerShard",
                            "IterableDatasetShard"],
    "trainer.logging": ["get_logger"],
    "trainer.big_modeling": ["cpu_offload", "disk_offload", "dispatch_model", "init_empty_weights", "init_on_device",
                             "load_checkpoint_and_dispatch", "infer_auto_device_map", "cpu_offload_with_hook"],
    "trainer.inference": ["prepare_pippy"],
    "trainer.utils.dataclasses": ["DistributedType", "DataLoaderConfiguration", "ProjectConfiguration",
                                  "GradientAccumulationPlugin", "DeepSpeedPlugin", "FullyShardedDataParallelPlugin"],
    "trainer.utils.operations": ["gather", "gather_object", "broadcast", "broadcast_object_list", "reduce",
                                 "pad_across_processes", "send_to_device"],
}


@pytest.mark.parametrize(("module", "names"), [("trainer", ACCELERATE_TOP_LEVEL), ("trainer.utils", ACCELERATE_UTILS),
                                               *MODULE_PATHS.items()])
def test_every_accelerate_name_imports_from_the_trainer_path(module, names):
    imported = importlib.import_module(module)
    missing = [name for name in names if not hasattr(imported, name)]
    assert not missing, f"{module} lacks {missing}"


def test_names_that_cannot_mean_the_same_refuse_with_what_to_use_instead():
    from trainer.utils import MegatronEngine, MegatronLMDummyScheduler, save_fsdp_model

    for refusing, expected in ((MegatronEngine, "megatron_lm_plugin=MegatronLMPlugin"),
                               (save_fsdp_model, "accelerator.save_state()"),
                               (MegatronLMDummyScheduler, "strategy='megatron'")):
        with pytest.raises(NotImplementedError, match="is not available here: ") as error:
            refusing()
        assert expected in str(error.value)
    with pytest.raises(NotImplementedError, match="cpu_offload\\(model\\)"):
        trainer.cpu_offload_with_hook(torch.nn.Linear(2, 2))
    assert set(REASONS) <= set(ACCELERATE_UTILS) | {"cpu_offload_with_hook"}  # no reason for a name nobody imports
    with pytest.raises(AttributeError):
        trainer.utils.no_such_name  # noqa: B018


def test_availability_answers_from_this_machine():
    from trainer.utils import (
        compare_versions,
        is_bf16_available,
        is_cuda_available,
        is_datasets_available,
        is_torch_version,
        is_torch_xla_available,
    )

    assert is_datasets_available() and is_bf16_available() and not is_torch_xla_available()
    assert is_cuda_available() == torch.cuda.is_available()
    assert is_torch_version(">=", "2.6") and not is_torch_version("<", "2.0")
    assert compare_versions("torch", ">=", "2.6")
    with pytest.raises(ValueError, match="operation must be one of"):
        compare_versions("torch", "=>", "2.6")


def test_accelerator_state_and_gradient_state_read_the_current_accelerator():
    from trainer.state import AcceleratorState, GradientState

    assert GradientState().sync_gradients and GradientState().num_steps == 1 and not GradientState().initialized
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    state = AcceleratorState()
    assert state.mixed_precision == "no" and state.distributed_type == "NO" and state.num_processes == 1
    assert accelerator.state is not None and isinstance(accelerator.state, AcceleratorState)
    linear = torch.nn.Linear(1, 1)
    model, optimizer = accelerator.prepare(linear, torch.optim.SGD(linear.parameters()))
    loader = accelerator.prepare(DataLoader(torch.arange(6.0).reshape(6, 1), batch_size=2))
    seen = []
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(batch).sum())
            seen.append((GradientState().sync_gradients, GradientState().end_of_dataloader, GradientState().in_dataloader))
    assert seen == [(False, False, True), (True, False, True), (True, True, True)]
    assert not GradientState().in_dataloader and accelerator.gradient_state.num_steps == 2
    AcceleratorState._reset_state()
    assert AcceleratorState().mixed_precision == "no" and not GradientState().initialized


def test_module_level_prepare_data_loader_and_skip_first_batches():
    from trainer.data_loader import SeedableRandomSampler, prepare_data_loader, skip_first_batches

    torch.manual_seed(7)
    loader = prepare_data_loader(DataLoader(list(range(10)), batch_size=2, shuffle=True), use_seedable_sampler=True)
    assert isinstance(loader.sampler, SeedableRandomSampler) and loader.sampler.initial_seed == 7
    first = [batch.tolist() for batch in loader]
    assert sorted(sum(first, [])) == list(range(10))
    assert [batch.tolist() for batch in skip_first_batches(DataLoader(list(range(10)), batch_size=2), 3)] == [[6, 7], [8, 9]]
    # On its own in a DataLoader the sampler moves to the next epoch after each pass, as Accelerate's does.
    sampler = SeedableRandomSampler(list(range(8)), data_seed=3)
    passes = [list(sampler), list(sampler)]
    assert passes[0] != passes[1] and sampler.epoch == 2
    # Process 0 of 2 reading dispatched batches: each global batch of 2 x 4 is cut by the script's own slice_fn.
    calls = []

    def every_other(batch, data_slice, process_index=None, num_processes=None):
        calls.append((data_slice, process_index, num_processes))
        return batch[process_index::num_processes]

    dispatched = prepare_data_loader(DataLoader(list(range(16)), batch_size=4), num_processes=2, process_index=0,
                                     dispatch_batches=True, slice_fn_for_dispatch=every_other)
    assert [batch.tolist() for batch in dispatched] == [[0, 2, 4, 6], [8, 10, 12, 14]]
    assert calls == [(slice(0, 4), 0, 2)] * 2


def test_profile_writes_a_chrome_trace(tmp_path):
    from trainer.utils import ProfileKwargs

    handler = ProfileKwargs(activities=["cpu"], record_shapes=True, output_trace_dir=str(tmp_path))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    with accelerator.profile() as profiler:
        torch.ones(8, 8) @ torch.ones(8, 8)
    assert "aten::mm" in profiler.key_averages().table()
    trace = json.loads((tmp_path / "profile_0.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    with pytest.raises(ValueError, match="not a profiler activity"):
        ProfileKwargs(activities=["gpu"])


def _train(accelerator, model, optimizer, steps):
    for step in steps:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        accelerator.backward(F.mse_loss(model(x), torch.zeros(4, 1)))
        optimizer.step()
        optimizer.zero_grad()


def test_dynamo_backend_compiles_in_place_and_checkpoints_keep_their_keys(tmp_path):
    from trainer.utils import TorchDynamoPlugin

    def run(steps, resume=None):  # steps: which steps of one schedule this run trains
        trainer.PartialState._reset_state()
        accelerator = Accelerator(cpu=True, dynamo_plugin=TorchDynamoPlugin(backend="aot_eager"))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.01))
        assert model._compiled_call_impl is not None  # compiled, and still the user's Sequential
        if resume is not None:
            accelerator.load_state(resume)
        _train(accelerator, model, optimizer, steps)
        return accelerator, model

    accelerator, model = run(range(2))
    accelerator.save_state(tmp_path / "checkpoint")
    assert list(accelerator.get_state_dict(model)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "checkpoint" / "model.safetensors")) == ["0.bias", "0.weight", "2.bias",
                                                                                  "2.weight"]
    _, uninterrupted = run(range(5))
    _, resumed = run(range(2, 5), resume=tmp_path / "checkpoint")
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="Did you mean 'inductor'"):
        Accelerator(cpu=True, dynamo_backend="indutor")


def test_launch_takes_accelerate_launch_flags(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import os, sys, torch\nfrom trainer import Accelerator\naccelerator = Accelerator()\n"
                      "model = accelerator.prepare(torch.nn.Linear(2, 2))\n"
                      "sys.stdout.write(f'rank {accelerator.process_index} {accelerator.dynamo_plugin.backend.value} '\n"
                      "                 f'{model._compiled_call_impl is not None} {os.environ[\"OMP_NUM_THREADS\"]}\\n')\n")
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", "--dynamo_backend", "eager",
                             "--num_cpu_threads_per_process", "1", "--quiet", str(script))
    assert code == 0, err
    assert sorted(line for line in out.splitlines() if line.startswith("rank")) == [
        "rank 0 EAGER True 1", "rank 1 EAGER True 1"]
    for flags, reason in ((["--tpu"], "--tpu is not available: TPU pod launches"),
                          (["--parallelism_config_cp_size", "2"], "--parallelism_config_cp_size is not available"),
                          (["--parallelism_config_tp_size", "two"], "--parallelism_config_tp_size two: give a whole"),
                          (["--parallelism_config_pp_size", "0"], "--parallelism_config_pp_size 0: give a whole"),
                          (["--num_processes", "4", "--parallelism_config_pp_size", "2", "--parallelism_config_tp_size",
                            "2"], "ParallelismConfig(pp_size=2, tp_size=2): pipeline stages are traced graphs"),
                          (["--dynamo_backend", "indutor"], "Did you mean 'inductor'?")):
        code, _, err = run_cli("launch", *flags, str(script))
        assert code == 2 and err.startswith("trainer launch: ") and reason in err and len(err.splitlines()) == 1, err


def test_accelerate_is_neither_a_dependency_nor_imported():
    import subprocess
    import sys
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    assert not [r for r in requirements if r.split("[")[0].split(">")[0].split("=")[0].strip() == "accelerate"]
    modules = ", ".join(sorted(MODULE_PATHS) + ["trainer.local_sgd", "trainer.test_utils", "trainer.big_modeling"])
    probe = (f"import importlib, sys\nfor m in '{modules}'.split(', '): importlib.import_module(m)\n"
             "print([m for m in sys.modules if m == 'accelerate' or m.startswith('accelerate.')])")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_accelerate_config_files_with_fp8_and_parallelism_sections_load_and_refuse_what_cannot_run(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("print('ran')\n")
    fp8 = tmp_path / "fp8.yaml"
    fp8.write_text("distributed_type: 'NO'\nmixed_precision: fp8\nfp8_config:\n  backend: TE\n  fp8_format: E4M3\n"
                   "  amax_history_len: 1024\n  override_linear_precision: [false, false, false]\n")
    parallel = tmp_path / "cp.yaml"
    parallel.write_text("distributed_type: FSDP\nnum_processes: 8\nfsdp_config:\n  fsdp_version: 2\n"
                        "parallelism_config:\n  parallelism_config_cp_size: 8\n  parallelism_config_tp_size: 1\n")
    for path, reason in ((fp8, "fp8_config.backend: 'TE' is not available: fp8 runs through torchao"),
                         (parallel, "parallelism_config: parallelism_config_cp_size=8 is not available")):
        code, out, err = run_cli("config", "validate", str(path))
        assert code == 0 and "valid" in out, err
        code, _, err = run_cli("launch", "--config_file", str(path), str(script))
        assert code == 2 and err == f"trainer launch: {err.split('trainer launch: ', 1)[1]}" and reason in err, err
