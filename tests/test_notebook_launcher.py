"""notebook_launcher runs a plain function on two processes from this (non-launched) Python process."""

from __future__ import annotations

import tempfile

import pytest
import torch
from distributed_helpers import free_port

from trainer import Accelerator, PartialState, notebook_launcher


def train_and_report(scale: float) -> dict:
    """Defined at module level, as in a notebook cell: every process sees the launched layout."""
    accelerator = Accelerator()
    total = accelerator.reduce(torch.tensor([float(accelerator.process_index + 1) * scale]), "sum")
    report = {"rank": accelerator.process_index, "world": accelerator.num_processes,
              "strategy": accelerator.strategy.name, "precision": accelerator.mixed_precision, "sum": total.item()}
    accelerator.end_training()
    return report


def test_two_processes_from_a_plain_session(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where torch's launcher keeps its torchelastic_* folder
    results = notebook_launcher(train_and_report, args=(10.0,), num_processes=2, mixed_precision="bf16",
                                use_port=free_port(), cpu=True)
    assert results == {r: {"rank": r, "world": 2, "strategy": "ddp", "precision": "bf16", "sum": 30.0} for r in (0, 1)}
    assert not PartialState._shared_state  # this process stayed out of the group


def test_one_process_runs_in_place():
    assert notebook_launcher(train_and_report, args=(2.0,), num_processes=1, cpu=True)[0]["sum"] == 2.0


def test_refused_when_this_process_already_has_a_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="create the Accelerator inside the launched function"):
            notebook_launcher(train_and_report, args=(1.0,), num_processes=2, use_port=free_port(), cpu=True)
    finally:
        dist.destroy_process_group()
