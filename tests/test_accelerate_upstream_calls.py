"""Calls from Accelerate's own tests (tests/test_accelerator.py), made the same way on local models: save_model as
one file and as shards, with safetensors and with pickle, read back by load_checkpoint_and_dispatch (upstream
reads some with load_checkpoint_in_model, which here points to load_checkpoint_and_dispatch); unwrap_model with
keep_torch_compile."""

from __future__ import annotations

import json

import pytest
import torch

from trainer import Accelerator, load_checkpoint_and_dispatch


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
    load_checkpoint_and_dispatch(model, tmp_path)
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
    load_checkpoint_and_dispatch(model, tmp_path)
    assert torch.allclose(expected, model(inputs), atol=1e-5)


def test_a_shard_size_that_is_not_a_size_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"max_shard_size='ten gigs'.*'10GB', '500MB' or '2GiB'"):
        Accelerator().save_model(torch.nn.Linear(2, 2), tmp_path / "out", max_shard_size="ten gigs")
    assert not (tmp_path / "out").exists()


def test_can_unwrap_distributed_compiled_model_keep_torch_compile():
    model = torch.nn.Linear(2, 4)
    accelerator = Accelerator()
    compiled_model = torch.compile(model)
    distributed_compiled_model = torch.compile(torch.nn.DataParallel(model))
    unwrapped_model = accelerator.unwrap_model(distributed_compiled_model, keep_torch_compile=True)
    assert compiled_model._orig_mod == unwrapped_model._orig_mod


def test_can_unwrap_distributed_compiled_model_remove_torch_compile():
    model = torch.nn.Linear(2, 4)
    accelerator = Accelerator()
    compiled_model = torch.compile(model)
    distributed_compiled_model = torch.compile(torch.nn.DataParallel(model))
    unwrapped_model = accelerator.unwrap_model(distributed_compiled_model, keep_torch_compile=False)
    assert compiled_model._orig_mod == unwrapped_model
