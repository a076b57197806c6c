"""The low-code API on one process: prepare, errors, collectives, clipping, memory, seeding."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import classification_data, mlp, same_weights
from torch.utils.data import DataLoader, TensorDataset

from strategies import SingleDevice
from trainer import AcceleratedOptimizer, AcceleratedScheduler, Accelerator, PartialState, PreparedDataLoader, set_seed
from trainer.utils import DistributedType


def test_prepare_accepts_any_order_and_returns_the_same_order():
    accelerator = Accelerator()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    loader = DataLoader(TensorDataset(*classification_data(8)), batch_size=4)
    out = accelerator.prepare(scheduler, loader, optimizer, model)
    assert [type(o) for o in out] == [AcceleratedScheduler, PreparedDataLoader, AcceleratedOptimizer, type(model)]
    assert out[0].optimizers == [out[2]]
    assert accelerator.prepare(model) is model  # preparing twice is harmless
    assert accelerator.prepare(out[2]) is out[2]


def test_the_loop_equals_plain_pytorch_bit_for_bit():
    """With shuffling off and fp32, the prepared loop is the plain loop."""
    x, y = classification_data(40)

    def run(accelerate: bool):
        PartialState._reset_state()
        torch.manual_seed(0)
        model = mlp(dropout=0.2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        accelerator = Accelerator() if accelerate else None
        if accelerator:
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        for _ in range(3):
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                accelerator.backward(loss) if accelerator else loss.backward()
                optimizer.step()
        return model

    assert same_weights(run(True), run(False))


def test_unknown_argument_suggests_the_right_one():
    with pytest.raises(TypeError, match=r"unexpected argument 'mixed_precison'. Did you mean 'mixed_precision'\?"):
        Accelerator(mixed_precison="bf16")


def test_misspelt_tracker_is_one_error_with_a_suggestion():
    with pytest.raises(ValueError, match=r"Unknown tracker 'tensorbaord'\. Did you mean 'tensorboard'\?"):
        Accelerator(log_with=["csv", "tensorbaord"])


def test_strategy_names():
    assert isinstance(Accelerator(strategy="auto").strategy, SingleDevice)
    PartialState._reset_state()
    assert isinstance(Accelerator(strategy="single_device").strategy, SingleDevice)
    with pytest.raises(ValueError, match=r"Unknown strategy 'singel_device'.*Did you mean 'single_device'\?"):
        Accelerator(strategy="singel_device")
    if importlib.util.find_spec("torch_xla") is None:
        with pytest.raises(ImportError, match=r"pip install 'trainer-kit\[xla\]'|torch_xla"):
            Accelerator(strategy="xla")


def test_forcing_cpu():
    accelerator = Accelerator(cpu=True)
    assert accelerator.device == torch.device("cpu")
    assert PartialState().device == torch.device("cpu")
    model = accelerator.prepare(mlp())
    assert next(model.parameters()).device.type == "cpu"


def test_single_process_facts():
    accelerator = Accelerator()
    assert (accelerator.process_index, accelerator.num_processes, accelerator.is_main_process,
            accelerator.is_local_main_process, accelerator.use_distributed) == (0, 1, True, True, False)
    assert accelerator.distributed_type == DistributedType.NO == "NO" and accelerator.strategy.name == "single_device"
    assert accelerator.mixed_precision == "no"


def test_collectives_on_one_process():
    accelerator = Accelerator()
    t = torch.arange(6.0).view(3, 2)
    assert torch.equal(accelerator.gather(t), t)
    assert accelerator.gather(torch.tensor(2.0)).tolist() == [2.0]
    assert torch.equal(accelerator.reduce(t, "mean"), t)
    assert torch.equal(accelerator.reduce(t, "sum", scale=2.0), 2 * t)
    assert torch.equal(accelerator.pad_across_processes(t, dim=1), t)
    assert accelerator.gather_for_metrics({"a": t})["a"].tolist() == t.tolist()
    assert accelerator.gather_for_metrics(["x", "y"]) == ["x", "y"]
    with pytest.raises(ValueError, match="reduction='avg' is not one of"):
        accelerator.reduce(t, "avg")


def test_clip_grad_norm_acts_on_boundaries_only():
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = classification_data(8)
    norms = []
    for half in (slice(0, 4), slice(4, 8)):
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x[half]), y[half]))
            norms.append(accelerator.clip_grad_norm_(model.parameters(), 0.01))
    reference = mlp()
    F.cross_entropy(reference(x), y).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    assert norms[0] is None
    assert abs(norms[1].item() - expected.item()) <= 1e-6
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert abs(total.item() - 0.01) <= 1e-6


def test_clip_grad_value():
    accelerator = Accelerator()
    model = accelerator.prepare(mlp())
    x, y = classification_data(8)
    accelerator.backward(F.cross_entropy(model(x), y) * 100)
    accelerator.clip_grad_value_(model.parameters(), 0.001)
    limit = torch.tensor(0.001)  # the clamp happens in float32
    assert max(p.grad.abs().max() for p in model.parameters()) == limit


def test_free_memory_releases_references():
    accelerator = Accelerator()
    model = mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model, optimizer = accelerator.free_memory(model, optimizer)
    assert (model, optimizer) == (None, None)
    assert accelerator._models == [] and accelerator._optimizers == []


def test_set_seed_makes_python_numpy_and_torch_repeat():
    set_seed(11)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(11)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_save_model_writes_safetensors(tmp_path):
    from safetensors.torch import load_file

    accelerator = Accelerator(mixed_precision="bf16")
    model = accelerator.prepare(mlp())
    path = accelerator.save_model(model, tmp_path / "out")
    assert path == tmp_path / "out" / "model.safetensors"
    saved = load_file(str(path))
    assert sorted(saved) == sorted(model.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_partial_state_print_and_split_on_one_process(capsys):
    state = PartialState()
    state.print("hello")
    assert capsys.readouterr().out == "hello\n"
    with state.split_between_processes([1, 2, 3]) as share:
        assert share == [1, 2, 3]
    assert state.on_main_process(lambda: 5)() == 5
    with state.main_process_first():
        pass


def test_trainer_env_command():
    result = subprocess.run([sys.executable, "-m", "trainer.cli.main", "env"], capture_output=True, text=True, check=True)
    assert f"- torch: {torch.__version__}" in result.stdout
    assert "- accelerator: none (CPU)" in result.stdout or "- accelerator: " in result.stdout


def test_trainer_command_without_arguments_shows_help():
    result = subprocess.run([sys.executable, "-m", "trainer.cli.main"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "env" in result.stdout


def test_mean_of_integers_is_float_on_one_process():
    accelerator = Accelerator()
    result = accelerator.reduce(torch.tensor([1, 2]), "mean")
    assert result.dtype == torch.float32 and result.tolist() == [1.0, 2.0]


def test_the_trainer_console_script_is_installed():
    script = Path(sys.executable).parent / "trainer"
    result = subprocess.run([str(script), "env"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("- trainer: ")


def test_prompt_tuning_optimizer_outside_a_frozen_model_is_fine():
    """An optimizer over parameters kept outside a frozen model trains them."""
    accelerator = Accelerator(cpu=True)
    model = mlp().requires_grad_(False)
    prompt = torch.nn.Parameter(torch.zeros(6))
    model, optimizer = accelerator.prepare(model, torch.optim.SGD([prompt], lr=0.1))
    x, y = classification_data(4)
    accelerator.backward(F.cross_entropy(model(x + prompt), y))
    optimizer.step()
    assert prompt.abs().sum() > 0
