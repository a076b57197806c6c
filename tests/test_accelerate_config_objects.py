"""Accelerate's enums, kwargs handlers, configurations and plugins, from trainer.utils, reach the parts they configure."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import WORKERS_DIR, run_cli, run_distributed
from torch.utils.data import DataLoader, TensorDataset

from strategies import DDP, FSDP, DeepSpeed
from strategies.deepspeed import PACKAGE as DEEPSPEED
from strategies.registry import BUILT_IN
from trainer import Accelerator, PartialState
from trainer.precision import precision_names
from trainer.utils import (
    AutocastKwargs,
    DataLoaderConfiguration,
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    LoggerType,
    MegatronLMPlugin,
    PrecisionType,
    ProjectConfiguration,
)


@pytest.fixture(autouse=True)
def fresh_state():
    PartialState._reset_state()
    yield
    PartialState._reset_state()


# -- enums ------------------------------------------------------------------------------------------------------------
def test_enums_are_strings_and_one_vocabulary_with_the_strategies_and_the_precision_table():
    assert DistributedType.MULTI_CPU == "MULTI_CPU" and str(DistributedType.FSDP) == "FSDP"
    assert "FSDP" in DistributedType and "fsdp" not in DistributedType
    assert json.dumps({"kind": DistributedType.DEEPSPEED}) == '{"kind": "DEEPSPEED"}'
    declared = {kind for strategy in BUILT_IN for kind in strategy.spec.distributed_types}
    assert set(DistributedType.list()) == declared
    assert set(PrecisionType.list()) == set(precision_names())
    assert Accelerator(mixed_precision=PrecisionType.BF16).mixed_precision == "bf16"


def test_distributed_type_of_one_process_and_of_a_plugin():
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type is DistributedType.NO
    PartialState._reset_state()
    assert Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin()).distributed_type is DistributedType.FSDP


# -- kwargs handlers --------------------------------------------------------------------------------------------------
def test_grad_scaler_kwargs_reach_the_fp16_scaler():
    accelerator = Accelerator(cpu=True, mixed_precision="fp16",
                              kwargs_handlers=[GradScalerKwargs(init_scale=1024.0, growth_interval=7, backoff_factor=0.25)])
    scaler = accelerator.scaler
    assert (scaler.get_scale(), scaler.get_growth_interval(), scaler.get_backoff_factor()) == (1024.0, 7, 0.25)


def test_autocast_kwargs_reach_every_forward():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return x * 2

    model = Accelerator(cpu=True, mixed_precision="bf16").prepare(Probe())
    model(torch.ones(2))
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", kwargs_handlers=[AutocastKwargs(enabled=False)])
    accelerator.prepare(Probe())(torch.ones(2))
    with accelerator.autocast():
        seen.append(torch.is_autocast_enabled("cpu"))
    assert seen == [True, False, False]


def test_handlers_are_checked_before_any_work():
    with pytest.raises(ValueError, match=r"DistributedDataParallelKwargs\(dim=1\) has no effect"):
        Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(dim=1)])
    with pytest.raises(ValueError, match="kwargs_handlers= holds two GradScalerKwargs objects: give one."):
        Accelerator(kwargs_handlers=[GradScalerKwargs(), GradScalerKwargs(init_scale=2.0)])
    with pytest.raises(TypeError, match="kwargs_handlers= takes AutocastKwargs, .*; got DataLoaderConfiguration."):
        Accelerator(kwargs_handlers=[DataLoaderConfiguration()])
    with pytest.raises(ValueError, match=r"InitProcessGroupKwargs\(init_method='tcp://x:1'\)"):
        Accelerator(kwargs_handlers=[InitProcessGroupKwargs(init_method="tcp://x:1")])
    with pytest.raises(ValueError, match=r"DDP\(comm_wrapper=\.\.\., comm_state_option=\.\.\.\) configure a PowerSGD hook"):
        Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(comm_wrapper="fp16")])
    assert not PartialState._shared_state  # refused before PartialState existed


def _yaml(folder, text):
    path = folder / "config.yaml"
    path.write_text(text)
    return path


def test_on_two_processes_ddp_kwargs_reach_ddp_and_the_timeout_reaches_the_group(tmp_path):
    result = run_distributed(WORKERS_DIR / "handlers_worker.py", nproc=2, args=["ddp"], timeout=120)
    assert "DDP OK rank 0" in result.stdout and "DDP OK rank 1" in result.stdout
    result = run_distributed(WORKERS_DIR / "handlers_worker.py", nproc=2, args=["timeout", str(tmp_path / "done")],
                             timeout=120)
    waited = float(re.search(r"TIMEOUT after ([\d.]+) s", result.stdout).group(1))
    assert 2.5 <= waited < 8.0, result.stdout  # InitProcessGroupKwargs(timeout=3 s), not gloo's 30 minutes
    # The same from the launcher's flag, with nothing in the script.
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", "--process_group_timeout", "3",
                             str(WORKERS_DIR / "handlers_worker.py"), "launch_timeout", str(tmp_path / "done_launch"))
    assert code == 0, err
    assert 2.5 <= float(re.search(r"TIMEOUT after ([\d.]+) s", out).group(1)) < 8.0, out
    code, _, err = run_cli("config", "validate", str(_yaml(tmp_path, "process_group_timeout: 0\n")))
    assert code == 2 and "process_group_timeout: must be at least 1, got 0." in err


# -- configurations ---------------------------------------------------------------------------------------------------
def _order(accelerator: Accelerator) -> list[int]:
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(12)), batch_size=4, shuffle=True))
    return [int(i) for (batch,) in loader for i in batch]


def test_dataloader_configuration():
    torch.manual_seed(1)
    first = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(data_seed=123, non_blocking=True))
    assert (first.split_batches, first.even_batches, first.dataloader_config.non_blocking) == (False, True, True)
    order = _order(first)
    PartialState._reset_state()
    torch.manual_seed(2)  # another process seed: data_seed alone decides the shuffle
    assert _order(Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(data_seed=123))) == order
    PartialState._reset_state()
    assert sorted(order) == list(range(12)) and order != list(range(12))
    split = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=False))
    assert (split.split_batches, split.even_batches) == (True, False)
    with pytest.raises(ValueError, match="dataloader_config= and split_batches=/even_batches= were both given"):
        Accelerator(dataloader_config=DataLoaderConfiguration(), split_batches=True)


def test_project_configuration_names_and_prunes_checkpoints(tmp_path):
    project = ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2)
    accelerator = Accelerator(cpu=True, project_config=project)
    assert accelerator.project_dir == tmp_path and accelerator.logging_dir == tmp_path
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        accelerator.save_state()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]
    with torch.no_grad():
        model.weight.zero_()
    assert accelerator.load_state() == tmp_path / "checkpoints" / "checkpoint_2"
    assert torch.all(model.weight == 3.0)
    with pytest.warns(UserWarning, match=r"automatic_checkpoint_naming=True\) names the checkpoints"):
        assert accelerator.save_state(tmp_path / "elsewhere").name == "checkpoint_3"
    PartialState._reset_state()
    again = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path),
                                                                      automatic_checkpoint_naming=True, iteration=2))
    again.prepare(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="checkpoint_2 exists already: this run would write over it"):
        again.save_state()
    with pytest.raises(ValueError, match="disagree: give one of them"):
        Accelerator(project_dir=tmp_path / "a", project_config=ProjectConfiguration(project_dir=str(tmp_path / "b")))


def test_gradient_accumulation_plugin():
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=3,
                                                                                              sync_each_batch=True))
    assert (accelerator.gradient_accumulation_steps, accelerator.accumulation.sync_each_batch) == (3, True)
    PartialState._reset_state()
    with pytest.raises(ValueError, match="gradient_accumulation_steps= and gradient_accumulation_plugin= were both given"):
        Accelerator(gradient_accumulation_steps=2, gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=2))


def test_logger_type_names_a_tracker(tmp_path):
    accelerator = Accelerator(cpu=True, log_with=LoggerType.TENSORBOARD, project_dir=tmp_path)
    assert [tracker.name for tracker in accelerator.trackers] == ["tensorboard"]


# -- plugins ----------------------------------------------------------------------------------------------------------
def test_fsdp_plugin_fields_become_the_strategys_options(monkeypatch):
    from torch.distributed.fsdp import MixedPrecisionPolicy, ShardingStrategy
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    plugin = FullyShardedDataParallelPlugin(
        sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, backward_prefetch="backward_pre",
        state_dict_type="sharded_state_dict", auto_wrap_policy="size_based_wrap", min_num_params=10,
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16),
        cpu_offload=False, use_orig_params=False, fsdp_version=2, activation_checkpointing=True,
        transformer_cls_names_to_wrap=["Block"])
    strategy = Accelerator(cpu=True, fsdp_plugin=plugin).strategy
    assert isinstance(strategy, FSDP)
    assert (strategy.sharding_strategy, strategy.state_dict_type, strategy.auto_wrap_policy, strategy.min_num_params,
            strategy.mixed_precision, strategy.offload_params, strategy.activation_checkpointing, strategy.layer_classes) == (
        "SHARD_GRAD_OP", "SHARDED_STATE_DICT", "SIZE_BASED_WRAP", 10, torch.bfloat16, False, True, ["Block"])
    # A torch wrap policy asks about each module alone; the launch configuration's keys fill what the plugin leaves open.
    PartialState._reset_state()
    monkeypatch.setenv("TRAINER_STRATEGY", "fsdp")
    monkeypatch.setenv("TRAINER_FSDP_CONFIG", json.dumps({"fsdp_sharding_strategy": "NO_SHARD", "fsdp_offload_params": True}))
    policy = functools.partial(size_based_auto_wrap_policy, min_num_params=100)
    strategy = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(
        sharding_strategy="FULL_SHARD", auto_wrap_policy=policy, mixed_precision_policy="fp16")).strategy
    assert (strategy.sharding_strategy, strategy.offload_params, strategy.mixed_precision) == ("FULL_SHARD", True, torch.float16)
    assert strategy.auto_wrap_policy(torch.nn.Linear(20, 20)) and not strategy.auto_wrap_policy(torch.nn.Linear(2, 2))


def test_plugin_fields_without_an_equivalent_and_conflicts_are_one_error_each():
    with pytest.raises(ValueError, match=r"FullyShardedDataParallelPlugin\(ignored_modules=\['head'\]\): fully_shard shards"):
        Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(ignored_modules=["head"]))
    with pytest.raises(ValueError, match=r"sharding_strategy=\.\.\.\): 'FULL_SHRAD' is not allowed\. Did you mean 'FULL_SHARD'"):
        Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(sharding_strategy="full_shrad"))
    with pytest.raises(ValueError, match="reduces gradients in fp32"):
        Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(
            mixed_precision_policy={"param_dtype": "bf16", "reduce_dtype": "bf16"}))
    with pytest.raises(ValueError, match="selects strategy 'fsdp', but the run is set to 'ddp'"):
        Accelerator(strategy="ddp", fsdp_plugin=FullyShardedDataParallelPlugin())
    with pytest.raises(ValueError, match="strategy=DDP\\(...\\) and FullyShardedDataParallelPlugin were both given"):
        Accelerator(strategy=DDP(), fsdp_plugin=FullyShardedDataParallelPlugin())
    with pytest.raises(ValueError, match=r"MegatronLMPlugin\(seq_length=\.\.\.\): configures Megatron-LM's own training loop"):
        MegatronLMPlugin(tp_degree=1, seq_length=128)
    assert MegatronLMPlugin(tp_degree=2, num_micro_batches=4).strategy_arguments() == {"tp_degree": 2, "num_micro_batches": 4}
    assert not PartialState._shared_state


@pytest.mark.skipif(not DEEPSPEED.available(), reason="deepspeed is not installed (pip install 'trainer-kit[deepspeed]')")
def test_deepspeed_plugin_fields_become_the_strategys_options():
    plugin = DeepSpeedPlugin(zero_stage=1, gradient_clipping=1.0, hf_ds_config={"train_micro_batch_size_per_gpu": "auto"})
    strategy = Accelerator(cpu=True, deepspeed_plugin=plugin).strategy
    assert isinstance(strategy, DeepSpeed)
    assert (strategy.zero_stage, strategy.config["gradient_clipping"], strategy.config["train_micro_batch_size_per_gpu"]) == (
        1, 1.0, "auto")
    PartialState._reset_state()
    with pytest.raises(ValueError, match=r"DeepSpeedPlugin\(enable_msamp=True\): MS-AMP is not available"):
        Accelerator(deepspeed_plugin=DeepSpeedPlugin(enable_msamp=True))
    with pytest.raises(ValueError, match="deepspeed_plugin= got 2 plugins"):
        Accelerator(deepspeed_plugin={"a": DeepSpeedPlugin(), "b": DeepSpeedPlugin()})
    with pytest.raises(ValueError, match="FullyShardedDataParallelPlugin and DeepSpeedPlugin were both given"):
        Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(), deepspeed_plugin=DeepSpeedPlugin())


def test_a_plugin_trains_one_process():
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(sharding_strategy="FULL_SHARD"))
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])  # learnable exactly
    before = F.mse_loss(model(x), y).item()
    for _ in range(40):
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    assert F.mse_loss(model(x), y).item() < before / 10


# -- memory -----------------------------------------------------------------------------------------------------------
def test_find_executable_batch_size_shrinks_on_real_out_of_memory_errors():
    from trainer.utils import find_executable_batch_size

    tried = []

    @find_executable_batch_size(starting_batch_size=128)
    def train(batch_size, scale):
        tried.append(batch_size)
        if batch_size > 40:
            torch.empty(batch_size * scale, 2**40, dtype=torch.uint8)  # the CPU allocator refuses: tens of terabytes
        return batch_size

    assert train(1) == 36
    assert tried == [128, 115, 103, 92, 82, 73, 65, 58, 52, 46, 41, 36]
    with pytest.raises(TypeError, match="got the batch size as its first argument"):
        train(64, 1)

    @find_executable_batch_size(starting_batch_size=4, reduce_batch_size_fn=lambda: 0)
    def never(batch_size):
        torch.empty(2**50, dtype=torch.uint8)

    with pytest.raises(RuntimeError, match="No executable batch size found, reached zero."):
        never()

    @find_executable_batch_size
    def wrong(batch_size):
        raise ValueError("not about memory")

    with pytest.raises(ValueError, match="not about memory"):
        wrong()


def test_fsdp_state_dict_configs_set_the_state_dict_type_and_must_agree_with_it():
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, ShardedStateDictConfig

    full = FullyShardedDataParallelPlugin(state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
                                          optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False))
    assert Accelerator(cpu=True, fsdp_plugin=full).strategy.state_dict_type == "FULL_STATE_DICT"
    PartialState._reset_state()
    sharded = FullyShardedDataParallelPlugin(state_dict_config=ShardedStateDictConfig())
    assert Accelerator(cpu=True, fsdp_plugin=sharded).strategy.state_dict_type == "SHARDED_STATE_DICT"
    PartialState._reset_state()
    with pytest.raises(ValueError, match=r"state_dict_config=FullStateDictConfig\(\.\.\.\)\) asks for a FULL_STATE_DICT "
                                         r"but state_dict_type is 'SHARDED_STATE_DICT'"):
        Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(
            state_dict_type="SHARDED_STATE_DICT", state_dict_config=FullStateDictConfig()))


def test_prepared_optimizers_pass_train_and_eval_on_and_save_writes_once(tmp_path):
    class ModalSGD(torch.optim.SGD):  # an optimizer with modes, as schedule-free ones have
        mode = "train"

        def train(self):
            self.mode = "train"

        def eval(self):
            self.mode = "eval"

    accelerator = Accelerator(cpu=True)
    parameter = torch.nn.Parameter(torch.ones(2))
    modal, plain = accelerator.prepare(ModalSGD([parameter], lr=0.1), torch.optim.SGD([parameter], lr=0.1))
    modal.eval()
    assert modal.optimizer.mode == "eval"
    modal.train()
    plain.eval()  # no modes: nothing to do
    assert modal.optimizer.mode == "train"
    accelerator.save({"weight": torch.arange(3.0)}, tmp_path / "state.safetensors", safe_serialization=True)
    accelerator.save({"step": 3}, tmp_path / "state.pt")
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "state.safetensors")["weight"], torch.arange(3.0))
    assert torch.load(tmp_path / "state.pt", weights_only=True) == {"step": 3}


def test_the_constructor_takes_every_argument_of_accelerates():
    import inspect

    upstream = ["device_placement", "split_batches", "mixed_precision", "gradient_accumulation_steps", "cpu",
                "dataloader_config", "deepspeed_plugin", "fsdp_plugin", "torch_tp_plugin", "megatron_lm_plugin",
                "rng_types", "log_with", "project_dir", "project_config", "gradient_accumulation_plugin",
                "step_scheduler_with_optimizer", "kwargs_handlers", "dynamo_backend", "dynamo_plugin",
                "deepspeed_plugins", "parallelism_config"]
    assert not set(upstream) - set(inspect.signature(Accelerator).parameters)
    Accelerator(cpu=True, rng_types=["torch", "generator"])  # accepted: shuffling is seeded, nothing to sync
    for arguments, message in (({"rng_types": ["torhc"]}, r"rng_types=\['torhc'\]: not a random number generator"),
                               ({"torch_tp_plugin": object()}, "torch_tp_plugin= is not available"),
                               ({"deepspeed_plugin": DeepSpeedPlugin(), "deepspeed_plugins": DeepSpeedPlugin()},
                                "deepspeed_plugin= and deepspeed_plugins= were both given")):
        with pytest.raises(ValueError, match=message):
            Accelerator(cpu=True, **arguments)
    with pytest.raises(TypeError, match=r"parallelism_config= takes a ParallelismConfig"):  # the sizes: tests/test_parallelism.py
        Accelerator(cpu=True, parallelism_config=object())
