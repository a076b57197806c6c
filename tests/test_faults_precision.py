"""Fault catalogue, precision: fp16 runs that learn nothing, misspelt precisions, fp8 where it cannot run.

Each test is one catalogue case (listed in docs/troubleshooting.md): the error type, a message that
names the problem and the fix, and, where a checkpoint was saved, that it still loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fault_helpers import assert_still_loads, prepared, train_steps
from models import classification_data, mlp

from trainer import Accelerator
from trainer.precision import Float16Precision, SkippedStepsError, resolve_precision
from trainer.precision.fp8 import Float8Precision, Fp8UnavailableError, fp8_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
CAUSES = ("loss is finite in fp32", "lower the learning rate", "mixed_precision='bf16'")


def fp16_run(precision: Float16Precision | str = "fp16"):
    """An fp16 Accelerator with a small model and SGD prepared; returns it, the model, the optimizer and a batch."""
    accelerator = Accelerator(mixed_precision=precision, cpu=True)
    model = mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return accelerator, model, optimizer, classification_data(16)


def step(accelerator, model, optimizer, batch, poison: float | None = None) -> float:
    """One training step; ``poison`` (inf or nan) multiplies the loss so every gradient is non-finite."""
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    accelerator.backward(loss * poison if poison is not None else loss)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_fp16_steps_skipped_in_a_row_warn_then_stop_with_the_scale(tmp_path):
    accelerator, model, optimizer, scheduler, loader = prepared(mixed_precision="fp16")
    train_steps(accelerator, model, optimizer, scheduler, loader, steps=2)
    accelerator.save_state(tmp_path / "ckpt")
    saved = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    batch = next(iter(loader))
    with pytest.warns(RuntimeWarning) as caught, pytest.raises(SkippedStepsError) as error:
        for _ in range(200):
            step(accelerator, model, optimizer, batch, poison=float("nan"))
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1, warned
    assert "optimizer step 12 was skipped" in warned[0] and "the last 10 in a row" in warned[0], warned[0]
    assert "loss scale is now 64" in warned[0] and all(cause in warned[0] for cause in CAUSES), warned[0]
    message = str(error.value)
    # 2 good steps, then 27 skipped ones: 65536 halved 27 times is 2**-11, below the 2**-10 floor.
    assert "optimizer step 29 was skipped" in message and "the last 27 in a row" in message, message
    assert "loss scale is now 0.000488, below min_loss_scale=0.000977" in message, message
    assert all(cause in message for cause in CAUSES), message
    assert isinstance(error.value, FloatingPointError)
    # No skipped step touched the weights, and the checkpoint saved before is whole.
    now = accelerator.unwrap_model(model).state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())
    assert_still_loads(tmp_path / "ckpt", saved)


def test_fp16_max_skipped_steps_stops_a_run_whose_scale_falls_slowly():
    precision = Float16Precision(torch.device("cpu"), max_skipped_steps=6, backoff_factor=0.9)
    accelerator, model, optimizer, batch = fp16_run(precision)
    before = snapshot(model)
    with pytest.raises(SkippedStepsError) as error:
        for _ in range(50):
            step(accelerator, model, optimizer, batch, poison=float("inf"))
    message = str(error.value)
    assert "optimizer step 6 was skipped" in message and "reaching max_skipped_steps=6" in message, message
    assert "loss scale is now 3.48e+04" in message and all(cause in message for cause in CAUSES), message
    assert all(torch.equal(snapshot(model)[k], v) for k, v in before.items())


def test_fp16_occasional_skipped_steps_neither_warn_nor_stop():
    accelerator, model, optimizer, batch = fp16_run()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the case
        for index in range(40):
            losses.append(step(accelerator, model, optimizer, batch, poison=float("inf") if index % 8 == 3 else None))
    assert accelerator.precision.skipped == 5 and accelerator.precision.skipped_in_a_row == 0
    assert accelerator.scaler.get_scale() == 2.0**16 / 2**5
    assert losses[-1] < losses[0] - 0.1, losses  # the good steps trained


@pytest.mark.parametrize("argument, value, kind", [
    ("max_skipped_steps", 0, "a positive int"),
    ("warn_after_skipped_steps", 2.5, "a positive int"),
    ("min_loss_scale", -1.0, "a positive number"),
], ids=["max_skipped_steps=0", "warn_after_skipped_steps=2.5", "min_loss_scale=-1"])
def test_fp16_bad_skip_thresholds_are_refused(argument, value, kind):
    with pytest.raises(ValueError) as error:
        Float16Precision(torch.device("cpu"), **{argument: value})
    assert str(error.value) == (f"Float16Precision({argument}={value!r}): give {kind}, or None to turn the check off.")


def test_fp16_misspelt_scaler_argument():
    with pytest.raises(TypeError) as error:
        resolve_precision("fp16", torch.device("cpu"), scaler_kwargs={"init_scal": 2.0**10})
    assert str(error.value) == ("Unknown fp16 scaler argument 'init_scal'. Did you mean 'init_scale'? Valid: init_scale, "
                                "growth_factor, backoff_factor, growth_interval, enabled, warn_after_skipped_steps, "
                                "max_skipped_steps, min_loss_scale.")


@pytest.mark.parametrize("name, suggestion", [("bf32", "fp32"), ("fp61", "fp16"), ("float61", "float16")],
                         ids=["bf32", "fp61", "float61"])
def test_misspelt_precision_names_the_valid_values(name, suggestion):
    with pytest.raises(ValueError) as error:
        Accelerator(mixed_precision=name, cpu=True)
    message = str(error.value)
    assert message.startswith(f"Unknown precision {name!r}; valid values: ['no', 'fp32', 'fp16', 'bf16', 'fp8']."), message
    assert message.endswith(f"Did you mean {suggestion!r}?"), message


def test_fp8_on_a_machine_without_an_fp8_gpu_names_the_reason_and_bf16():
    with pytest.raises(Fp8UnavailableError) as error:
        Accelerator(mixed_precision="fp8", cpu=True)
    message = str(error.value)
    assert message.startswith("mixed_precision='fp8': fp8 training needs torchao and a CUDA GPU"), message
    # The first reason that applies here: a CPU-only PyTorch, a GPU below 8.9, or (cpu=True) the CPU device.
    reason = fp8_unavailable_reason(None) or fp8_unavailable_reason(torch.device("cpu"))
    assert reason and f"; {reason}." in message and "Use mixed_precision='bf16' instead" in message, message


_WITHOUT_TORCHAO = """
import sys
sys.modules["torchao"] = None  # as if it were not installed
from trainer import Accelerator
try:
    Accelerator(mixed_precision="fp8", cpu=True)
except ValueError as error:
    print(type(error).__name__, error)
"""


def test_fp8_without_torchao_names_the_pip_line():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCHAO], env=env, capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("Fp8UnavailableError mixed_precision='fp8': fp8 training needs torchao"), result.stdout
    assert "the torchao backend is not installed: pip install torchao" in result.stdout, result.stdout
    assert "Use mixed_precision='bf16' instead" in result.stdout


@pytest.mark.parametrize("argument, value, suggestion", [
    ("backend", "torchoa", "torchao"), ("recipe", "rowwsie", "rowwise"),
], ids=["backend", "recipe"])
def test_fp8_misspelt_backend_or_recipe(argument, value, suggestion):
    with pytest.raises(ValueError) as error:
        Float8Precision(torch.device("cpu"), **{argument: value})
    message = str(error.value)
    assert message.startswith(f"Float8Precision({argument}={value!r}):") and f"Did you mean {suggestion!r}?" in message
