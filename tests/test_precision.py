"""Precision policies: resolution from strings, autocast, fp16 loss scaling and skipped steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import classification_data, mlp

from trainer import Accelerator, Float16Precision, MixedPrecision, Precision


@pytest.mark.parametrize("name, expected", [
    ("no", Precision), ("fp32", Precision), ("32", Precision), (None, Precision),
    ("fp16", Float16Precision), ("16-mixed", Float16Precision), ("BF16", MixedPrecision), ("bf16-mixed", MixedPrecision),
])
def test_precision_strings_resolve_once_to_objects(name, expected):
    accelerator = Accelerator(mixed_precision=name)
    assert type(accelerator.precision) is expected


def test_misspelt_precision_names_the_valid_values():
    with pytest.raises(ValueError) as error:
        Accelerator(mixed_precision="bf61")
    message = str(error.value)
    assert message == ("Unknown precision 'bf61'; valid values: ['no', 'fp32', 'fp16', 'bf16', 'fp8']. "
                       "Did you mean 'bf16'?")


def test_fp8_without_fp8_hardware_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="fp8 training needs torchao"):
        Accelerator(mixed_precision="fp8")


def test_precision_from_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("TRAINER_MIXED_PRECISION", "bf16")
    assert Accelerator().mixed_precision == "bf16"


def test_bf16_autocasts_the_forward_and_returns_fp32():
    accelerator = Accelerator(mixed_precision="bf16")
    model = accelerator.prepare(mlp())
    seen = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    output = model(torch.randn(4, 6))
    assert seen == [torch.bfloat16]
    assert output.dtype == torch.float32
    assert accelerator.scaler is None
    # The parameters themselves stay fp32.
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_unwrap_without_fp32_wrapper_restores_the_original_forward():
    accelerator = Accelerator(mixed_precision="bf16")
    model = accelerator.prepare(mlp())
    assert "forward" in model.__dict__
    inner = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    assert "forward" not in inner.__dict__
    seen = []
    inner[0].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    inner(torch.randn(2, 6))
    assert seen == [torch.float32]


def test_autocast_context_for_code_outside_the_model():
    accelerator = Accelerator(mixed_precision="bf16")
    with accelerator.autocast():
        product = torch.randn(3, 3) @ torch.randn(3, 3)
    assert product.dtype == torch.bfloat16


OPTIMIZERS = {
    "foreach": lambda params: torch.optim.AdamW(params, lr=0.1, fused=False, foreach=True),
    "for-loop": lambda params: torch.optim.AdamW(params, lr=0.1, fused=False, foreach=False),
    "fused": lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_fp16_overflow_skips_the_step_and_does_not_advance_the_scheduler(kind):
    accelerator = Accelerator(mixed_precision="fp16")
    model = mlp()
    optimizer = OPTIMIZERS[kind](model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    x, y = classification_data(8)
    scale = accelerator.scaler.get_scale()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = F.cross_entropy(model(x), y) * float("inf")  # forced overflow
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    assert accelerator.optimizer_step_was_skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scheduler.get_last_lr() == [0.1]
    assert scheduler.scheduler.last_epoch == 0
    assert accelerator.scaler.get_scale() == scale / 2

    accelerator.backward(F.cross_entropy(model(x), y))
    optimizer.step()
    scheduler.step()
    assert not accelerator.optimizer_step_was_skipped
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scheduler.get_last_lr() == [0.05]
    assert int(optimizer.state[next(iter(model.parameters()))]["step"]) == 1


def test_fp16_gradients_are_unscaled_before_clipping():
    accelerator = Accelerator(mixed_precision="fp16")
    model = mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = classification_data(8)
    accelerator.backward(F.cross_entropy(model(x), y))
    norm = accelerator.clip_grad_norm_(model.parameters(), 1e9)

    reference = mlp()
    with torch.autocast("cpu", dtype=torch.float16):
        output = reference(x)
    F.cross_entropy(output.float(), y).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9)
    assert abs(norm.item() - expected.item()) <= 1e-5 * expected.item()
    optimizer.step()  # unscaled once: GradScaler would raise if step unscaled again
    assert not accelerator.optimizer_step_was_skipped


def test_a_bad_precision_is_refused_before_the_process_state_exists():
    from trainer import PartialState

    with pytest.raises(ValueError, match="Unknown precision"):
        Accelerator(mixed_precision="fp61")
    assert not PartialState._shared_state
