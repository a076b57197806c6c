"""fp8 precision: which Linear layers are converted, the refusals off fp8 hardware, and (on a GPU) the speed-up."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from trainer import Accelerator
from trainer.precision.fp8 import Float8Precision, Fp8UnavailableError, convert_to_fp8, fp8_linear_plan

torchao = pytest.importorskip("torchao", reason="fp8 conversion needs torchao (pip install torchao)")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.gate = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)) * self.gate(x))


def model(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, width), Block(width), Block(width), nn.Linear(width, 24), nn.Linear(24, 3))


def kinds(module: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def test_first_last_and_odd_shapes_stay_in_high_precision():
    net = model()
    plan = fp8_linear_plan(net)
    assert plan["0"] == "first Linear" and plan["4"] == "last Linear"
    assert plan["3"] == "in_features=32, out_features=24: not multiples of 16"
    convert_to_fp8(net, plan)
    converted = {name for name, kind in kinds(net).items() if kind == "Float8Linear"}
    assert converted == {f"{b}.{layer}" for b in (1, 2) for layer in ("up", "gate", "down")}
    assert {kinds(net)[name] for name in ("0", "3", "4")} == {"Linear"}
    # Checkpoints keep the keys of the original layers.
    assert net.state_dict().keys() == model().state_dict().keys()


def test_skip_modules_by_name_glob_and_ending():
    plan = fp8_linear_plan(model(), skip_modules=["1.up", "*.gate", "down"])
    assert [name for name, verdict in plan.items() if verdict == "fp8"] == ["2.up"]
    assert plan["1.gate"] == plan["2.down"] == "in skip_modules"


def test_module_filter_and_keeping_the_ends_optional():
    plan = fp8_linear_plan(model(width=16), keep_first_and_last=False, module_filter=lambda m, name: not name.startswith("2."))
    # The ends are 10->16 and 24->3: still out, for their shapes, not their position.
    assert plan["0"].startswith("in_features=10") and plan["4"].startswith("in_features=24")
    assert plan["2.up"] == "refused by module_filter"
    assert plan["1.up"] == "fp8"


def test_converted_layers_use_the_chosen_recipe():
    net = convert_to_fp8(model(), fp8_linear_plan(model()), recipe="rowwise")
    layer = net[1].up
    assert isinstance(layer, Float8Linear)
    assert layer.config.cast_config_weight.scaling_granularity.value == "axiswise"


def test_fp8_on_cpu_is_refused_before_any_work():
    needs = "fp8 training needs torchao and a CUDA GPU with compute capability >= 8.9"
    with pytest.raises(Fp8UnavailableError, match=needs) as error:
        Accelerator(mixed_precision="fp8")
    assert "mixed_precision='bf16'" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_float8_policy_refuses_a_cpu_device_and_unknown_options():
    with pytest.raises(Fp8UnavailableError, match="this run is on the CPU"):
        Float8Precision(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"backend='jax'\): use one of \['torchao', 'te'\]"):
        Float8Precision(torch.device("cpu"), backend="jax")
    with pytest.raises(ValueError, match="the torchao backend knows"):
        Float8Precision(torch.device("cpu"), recipe="delayed")


def test_missing_transformer_engine_names_the_pip_line(monkeypatch):
    import importlib.util

    from trainer.precision import fp8 as precision_fp8

    real = importlib.util.find_spec
    monkeypatch.setattr(precision_fp8.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformer_engine" else real(name, *a))
    monkeypatch.setattr(precision_fp8.torch.version, "cuda", "12.8")  # a CPU-only PyTorch would be refused first
    reason = precision_fp8.fp8_unavailable_reason(None, backend="te")
    assert reason == "the te backend is not installed: pip install --no-build-isolation 'transformer_engine[pytorch]'"


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with compute capability >= 8.9 (fp8 tensor cores)")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fp8_trains_and_reports_the_step_time_against_bf16(compiled):
    width, batch, steps = 4096, 8192, 20

    def run(precision: str) -> tuple[float, float]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(width, width), *(Block(width) for _ in range(4)), nn.Linear(width, 16))
        accelerator = Accelerator(mixed_precision=precision)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        net, optimizer = accelerator.prepare(net, optimizer)
        step_model = torch.compile(net) if compiled else net
        x = torch.randn(batch, width, device=accelerator.device)
        y = torch.randn(batch, 16, device=accelerator.device)
        losses = []
        for step in range(steps + 3):
            if step == 3:  # the first steps compile and warm the allocator
                torch.cuda.synchronize()
                start = time.perf_counter()
            loss = nn.functional.mse_loss(step_model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        torch.cuda.synchronize()
        assert all(torch.isfinite(torch.tensor(losses)))
        return (time.perf_counter() - start) / steps, losses[-1]

    bf16_time, bf16_loss = run("bf16")
    fp8_time, fp8_loss = run("fp8")
    print(f"\n[{'compiled' if compiled else 'eager'}] step time bf16 {bf16_time * 1e3:.1f} ms, fp8 {fp8_time * 1e3:.1f} ms, "
          f"fp8/bf16 = {fp8_time / bf16_time:.2f}; final loss bf16 {bf16_loss:.4f}, fp8 {fp8_loss:.4f}")
    assert abs(fp8_loss - bf16_loss) < 0.1 * abs(bf16_loss) + 0.05


@pytest.fixture
def cpu_policy(monkeypatch):
    """A Float8Precision on the CPU, past the hardware check, to see what prepare does with it."""
    from trainer.precision import fp8 as precision_fp8

    monkeypatch.setattr(precision_fp8, "check_fp8_available", lambda *args, **kwargs: None)
    return lambda **options: Float8Precision(torch.device("cpu"), **options)


def test_prepare_converts_the_model_before_the_strategy_wraps_it(cpu_policy):
    policy = cpu_policy(skip_modules=["2.down"])
    accelerator = Accelerator(mixed_precision=policy)
    assert accelerator.mixed_precision == "fp8"
    net = accelerator.prepare(model())
    assert kinds(net)["1.down"] == "Float8Linear" and kinds(net)["2.down"] == "Linear"
    assert policy.plan["2.down"] == "in skip_modules"
    assert "forward" in net.__dict__  # the bf16 autocast wrapper, as for mixed_precision="bf16"


def test_a_model_with_nothing_to_convert_warns_and_trains_in_bf16(cpu_policy):
    accelerator = Accelerator(mixed_precision=cpu_policy())
    with pytest.warns(UserWarning, match="no Linear layer qualifies for fp8"):
        net = accelerator.prepare(nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 3)))
    assert set(kinds(net).values()) == {"Linear"}


def test_converted_layers_compute_close_to_full_precision():
    """PyTorch's CPU build has fp8 matmuls too (slow): enough to check the swapped layers' arithmetic."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    fp8 = nn.Sequential(*(nn.Linear(64, 64) for _ in range(3)))
    fp8.load_state_dict(reference.state_dict())
    convert_to_fp8(fp8, fp8_linear_plan(fp8))
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp8(x)
    out.float().sum().backward()
    expected = reference(x)
    assert isinstance(fp8[1], Float8Linear) and fp8[1].weight.grad is not None
    assert (out.float() - expected).abs().max() < 0.1 * expected.abs().max()
