"""The XLA strategy on one XLA CPU device (PJRT_DEVICE=CPU): training, checkpoints, resume.

torch_xla must match torch's version exactly, so these tests run in their own environment
(`make test-xla`: torch 2.9 + torch_xla 2.9). In the normal environment only the refusal without
torch_xla runs; the rest is skipped.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from trainer_setup import make_trainer

from trainer import Accelerator, PartialState

HAVE_XLA = importlib.util.find_spec("torch_xla") is not None
needs_xla = pytest.mark.skipif(not HAVE_XLA, reason="torch_xla is not installed (run `make test-xla`)")


@pytest.fixture(autouse=True)
def xla_on_the_cpu(monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", os.environ.get("PJRT_DEVICE", "CPU"))


@pytest.mark.skipif(HAVE_XLA, reason="checks the refusal when torch_xla is missing")
def test_without_torch_xla_the_strategy_names_the_pip_line():
    with pytest.raises(ImportError, match=r"strategy='xla' needs torch_xla, which is not installed: pip install"):
        Accelerator(strategy="xla")


@needs_xla
def test_a_plain_loop_trains_on_the_xla_device():
    torch.manual_seed(0)
    accelerator = Accelerator(strategy="xla")
    assert accelerator.device.type == "xla"
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for _ in range(5):
        epoch = []
        losses.append(epoch)
        for xb, yb in loader:
            assert xb.device.type == "xla"
            loss = F.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            epoch.append(loss.item())
    assert sum(losses[-1]) < 0.95 * sum(losses[0])


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


@needs_xla
def test_the_trainer_trains_saves_and_resumes_to_the_same_weights(tmp_path):
    straight = make_trainer(tmp_path / "straight", strategy="xla", max_epochs=2, eval_data=None)
    straight.fit()
    expected, steps = _weights(straight), straight.global_step
    assert steps > 0 and all(torch.isfinite(v).all() for v in expected.values())
    PartialState._reset_state()

    first = make_trainer(tmp_path / "first", strategy="xla", max_epochs=1, eval_data=None)
    first.fit()
    checkpoint = tmp_path / "ckpt"
    first.save_checkpoint(checkpoint)
    files = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "optimizer.json", "xla_random_state.json"} <= files  # the single-device layout
    PartialState._reset_state()

    resumed = make_trainer(tmp_path / "resumed", init_seed=99, strategy="xla", max_epochs=2, eval_data=None)
    resumed.fit(resume=checkpoint)
    assert resumed.global_step == steps
    for key, value in _weights(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


@needs_xla
def test_the_trainer_validates_on_the_xla_device(tmp_path):
    trainer = make_trainer(tmp_path, strategy="xla", max_epochs=1)
    trainer.fit()
    assert 0 < trainer.metrics["val_loss"] < 10 and 0 <= trainer.metrics["val_acc"] <= 1
