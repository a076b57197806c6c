"""Calls from Accelerate's own tests (tests/test_accelerator.py), made the same way on local models: save_model as
one file and as shards, with safetensors and with pickle, read back by load_checkpoint_in_model and
load_checkpoint_and_dispatch; unwrap_model with keep_torch_compile; the rest of the Accelerator's surface."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from trainer import Accelerator, load_checkpoint_and_dispatch
from trainer.utils import load_checkpoint_in_model


class ModelForTest(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = torch.nn.Linear(3, 4)
        self.batchnorm = torch.nn.BatchNorm1d(4)
        self.linear2 = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.linear2(self.batchnorm(self.linear1(x)))


def signature(model: torch.nn.Module) -> float:
    return sum(p.abs().sum().item() for p in model.parameters())


def scramble(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.rand_like(parameter) + 1)


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_save_model(tmp_path, use_safetensors):
    accelerator = Accelerator()
    model = torch.nn.Linear(10, 10)
    expected = signature(model)
    path = accelerator.save_model(model, tmp_path, safe_serialization=use_safetensors)
    assert path.name == ("model.safetensors" if use_safetensors else "pytorch_model.bin") and path.is_file()
    scramble(model)
    load_checkpoint_in_model(model, tmp_path)
    assert signature(model) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_save_sharded_model(tmp_path, use_safetensors):
    accelerator = Accelerator()
    inputs = torch.randn(3, 3)
    model = ModelForTest().eval()
    expected = model(inputs)
    index = accelerator.save_model(model, tmp_path, safe_serialization=use_safetensors, max_shard_size=100)
    suffix = "safetensors" if use_safetensors else "bin"
    shards = sorted(p.name for p in tmp_path.glob(f"*.{suffix}"))
    assert len(shards) == 3 and index.name == f"{'model' if use_safetensors else 'pytorch_model'}.{suffix}.index.json"
    assert set(json.loads(index.read_text())["weight_map"].values()) == set(shards)
    scramble(model)
    load_checkpoint_in_model(model, tmp_path)
    assert torch.allclose(expected, model(inputs), atol=1e-5)
    scramble(model)
    load_checkpoint_and_dispatch(model, tmp_path)
    assert torch.allclose(expected, model(inputs), atol=1e-5)


def test_a_shard_size_that_is_not_a_size_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"max_shard_size='ten gigs'.*'10GB', '500MB' or '2GiB'"):
        Accelerator().save_model(torch.nn.Linear(2, 2), tmp_path / "out", max_shard_size="ten gigs")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep_torch_compile", [True, False])
def test_can_unwrap_distributed_compiled_model(keep_torch_compile):
    model = torch.nn.Linear(2, 4)
    accelerator = Accelerator()
    compiled_model = torch.compile(model)
    distributed_compiled_model = torch.compile(torch.nn.DataParallel(model))
    unwrapped_model = accelerator.unwrap_model(distributed_compiled_model, keep_torch_compile=keep_torch_compile)
    if keep_torch_compile:
        assert compiled_model._orig_mod == unwrapped_model._orig_mod
    else:
        assert compiled_model._orig_mod == unwrapped_model


# Accelerate 1.16's Accelerator: every public method and property a script may call or read.
ACCELERATOR_NAMES = [
    "accumulate", "autocast", "backward", "check_trigger", "clear", "clip_grad_norm_", "clip_grad_value_",
    "context_parallel_rank", "data_parallel_rank", "data_parallel_shard_rank", "deepspeed_plugin",
    "deepspeed_ulysses_dl_adapter", "device", "dispatch_batches", "distributed_type", "end_training", "even_batches",
    "fp8_backend", "free_memory", "gather", "gather_for_metrics", "get_state_dict", "get_tracker",
    "gradient_accumulation_steps", "init_trackers", "is_composable_parallelism_enabled", "is_fsdp2",
    "is_last_process", "is_local_main_process", "is_main_process", "join_uneven_inputs", "load_state",
    "local_main_process_first", "local_process_index", "log", "logging_dir", "lomo_backward", "main_process_first",
    "maybe_context_parallel", "mixed_precision", "multi_device", "no_sync", "non_blocking", "num_processes",
    "on_last_process", "on_local_main_process", "on_local_process", "on_main_process", "on_process",
    "optimizer_step_was_skipped", "pad_across_processes", "parallelism_config", "pipeline_parallel_rank", "prepare",
    "prepare_data_loader", "prepare_model", "prepare_optimizer", "prepare_scheduler", "print", "process_index",
    "profile", "project_dir", "reduce", "register_for_checkpointing", "register_load_state_pre_hook",
    "register_save_state_pre_hook", "save", "save_iteration", "save_model", "save_state", "set_trigger",
    "should_save_model", "skip_first_batches", "split_batches", "split_between_processes", "sync_gradients",
    "tensor_parallel_rank", "torch_device_mesh", "trigger_sync_in_backward", "unscale_gradients", "unwrap_model",
    "use_distributed", "use_seedable_sampler", "use_stateful_dataloader", "verify_device_map", "wait_for_everyone"
]


def test_every_public_name_of_accelerates_accelerator_is_here():
    from trainer.state import PartialState

    def lacking(obj, names):  # looked up without running properties (the rank ones raise without a mesh)
        missing = object()
        return [name for name in names if inspect.getattr_static(obj, name, missing) is missing]

    assert lacking(Accelerator(), ACCELERATOR_NAMES) == []
    assert lacking(PartialState(), ("on_local_process", "default_device", "set_device")) == []


def test_the_layout_facts_of_one_process():
    accelerator = Accelerator()
    assert accelerator.parallelism_config is None and accelerator.torch_device_mesh is None
    for name in ("data_parallel_rank", "data_parallel_shard_rank", "tensor_parallel_rank", "pipeline_parallel_rank",
                 "context_parallel_rank"):
        with pytest.raises(RuntimeError, match=r"is not configured: give Accelerator\(parallelism_config="):
            getattr(accelerator, name)
    assert not accelerator.is_fsdp2 and not accelerator.is_composable_parallelism_enabled
    assert not accelerator.multi_device and accelerator.should_save_model  # the main process of its machine
    assert (accelerator.dispatch_batches, accelerator.non_blocking, accelerator.use_seedable_sampler,
            accelerator.use_stateful_dataloader) == (None, False, False, False)
    assert accelerator.deepspeed_plugin is None and accelerator.fp8_backend == "NO"
    assert accelerator.state.default_device == torch.device("cpu")


def test_on_local_process_runs_on_that_local_process_only():
    accelerator = Accelerator()
    ran = []

    @accelerator.on_local_process(local_process_index=0)
    def here():
        ran.append("here")

    @accelerator.on_local_process(local_process_index=1)
    def elsewhere():
        ran.append("elsewhere")

    here()
    elsewhere()
    assert ran == ["here"]


def test_verify_device_map_finds_a_model_dispatched_over_several_devices():
    accelerator = Accelerator()
    model = ModelForTest()
    assert not accelerator.verify_device_map(model)
    model.linear1.hf_device_map = {"linear1": "cpu"}
    assert not accelerator.verify_device_map(model)
    model.hf_device_map = {"linear1": "cpu", "linear2": "disk"}
    assert accelerator.verify_device_map(model)


def test_maybe_context_parallel_and_the_ulysses_adapter_leave_the_step_as_it_is():
    accelerator = Accelerator()
    tokens = torch.arange(8).reshape(1, 8)
    with accelerator.maybe_context_parallel(buffers=[tokens], buffer_seq_dims=[1], no_restore_buffers={tokens}):
        assert tokens.shape == (1, 8)
    loader = torch.utils.data.DataLoader(list(range(4)))
    assert accelerator.deepspeed_ulysses_dl_adapter(loader, torch.nn.Linear(2, 2)) is loader


def test_lomo_backward_updates_as_sgd_and_backward_with_a_learning_rate_routes_to_it():
    lomo_optim = pytest.importorskip("lomo_optim")
    x, y = torch.randn(8, 3), torch.randn(8, 5)
    torch.manual_seed(0)
    reference = ModelForTest()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        torch.nn.functional.mse_loss(reference(x), y).backward()
        sgd.step()
        sgd.zero_grad()

    for route in ("lomo_backward", "backward"):
        torch.manual_seed(0)
        model = ModelForTest()
        accelerator = Accelerator()
        model, optimizer = accelerator.prepare(model, lomo_optim.Lomo(model, lr=0.1))
        for _ in range(2):
            loss = torch.nn.functional.mse_loss(model(x), y)
            if route == "lomo_backward":
                accelerator.lomo_backward(loss, 0.1)
            else:
                accelerator.backward(loss, learning_rate=0.1)
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(model.parameters(), reference.parameters())), route
    with pytest.raises(ValueError, match=r"needs exactly one prepared LOMO optimizer .*pip install lomo-optim"):
        plain = Accelerator()
        net = plain.prepare(torch.nn.Linear(2, 2))
        plain.prepare(torch.optim.SGD(net.parameters(), lr=0.1))
        plain.lomo_backward(net(torch.ones(1, 2)).sum(), 0.1)


def test_the_device_helpers_of_accelerate_utils_on_this_machine():
    from trainer.utils import (
        get_distributed_backend,
        get_model_tp_size,
        get_torch_accelerator_backend,
        normalize_device,
    )

    kind, module = get_torch_accelerator_backend()
    if torch.accelerator.is_available():
        assert kind == torch.accelerator.current_accelerator().type and module is torch.get_device_module(kind)
    else:
        assert (kind, module) == (None, None) == get_torch_accelerator_backend(check_available=False)
        assert normalize_device(3) == 3  # a bare index stays one without an accelerator that needs its type
    assert get_distributed_backend("cpu") == "gloo" and get_distributed_backend("no-such-device") is None
    assert normalize_device("npu") == "npu:0" and normalize_device("cpu") == "cpu"
    model = ModelForTest()
    assert get_model_tp_size(model) is None
    model.config = type("Config", (), {"distributed_config": {"tp_size": 4}})()
    assert get_model_tp_size(model) == 4
    model.tp_size = 2
    assert get_model_tp_size(model) == 2


def test_load_checkpoint_in_model_keeps_the_parameters_an_optimizer_holds_and_names_what_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    from trainer.checkpoint_errors import CheckpointError

    source = ModelForTest()
    Accelerator().save_model(source, tmp_path / "full")
    model = ModelForTest()
    load_checkpoint_in_model(model, tmp_path / "full", dtype=torch.float64, keep_in_fp32_modules=["batchnorm"])
    assert model.linear1.weight.dtype == torch.float64 and model.batchnorm.weight.dtype == torch.float32
    assert torch.equal(model.linear1.weight, source.linear1.weight.double())
    model = ModelForTest()
    held = list(torch.optim.SGD(model.parameters(), lr=0.1).param_groups[0]["params"])
    load_checkpoint_in_model(model, tmp_path / "full")
    assert all(a is b for a, b in zip(held, model.parameters()))  # filled in place

    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("linear2")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.warns(UserWarning, match=r"2 key\(s\) of the model are not in .*linear2.bias"):
        load_checkpoint_in_model(ModelForTest(), tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\) .*or pass strict=False"):
        load_checkpoint_in_model(ModelForTest(), tmp_path / "partial.safetensors", strict=True)
    with pytest.raises(CheckpointError, match=r"1 shape mismatch\(es\): linear1.weight: checkpoint \(4, 3\) vs model"):
        wider = ModelForTest()
        wider.linear1 = torch.nn.Linear(3, 4, bias=False)
        wider.linear1.weight = torch.nn.Parameter(torch.zeros(4, 6))
        load_checkpoint_in_model(wider, tmp_path / "full")
    with pytest.raises(NotImplementedError, match="offloading is load_checkpoint_and_dispatch's job here"):
        load_checkpoint_in_model(ModelForTest(), tmp_path / "full", device_map={"": "disk"})
