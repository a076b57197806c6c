"""DDP and FSDP on two CPU processes (gloo) equal one process on the same global batch."""

from __future__ import annotations

import json

import torch
from ddp_setup import STEPS, dataset, make_model, train_steps
from distributed_helpers import WORKERS_DIR, run_distributed
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from trainer import Accelerator, PartialState, set_seed


def one_process(accumulation: int) -> dict[str, torch.Tensor]:
    PartialState._reset_state()
    set_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(dataset(), batch_size=16, shuffle=True))
    train_steps(accelerator, model, optimizer, loader)
    return model.state_dict()


def test_two_processes_equal_one_with_twice_the_batch(tmp_path):
    result = run_distributed(WORKERS_DIR / "ddp_worker.py", nproc=2, args=[str(tmp_path)], timeout=180)
    assert "OK rank 0" in result.stdout and "OK rank 1" in result.stdout
    for k in (1, 4):
        ddp = load_file(str(tmp_path / f"ddp_k{k}.safetensors"))
        single = one_process(k)
        diff = max((ddp[name] - single[name]).abs().max().item() for name in single)
        assert diff <= 1e-5, (k, diff)
        changed = max((single[name] - make_model().state_dict()[name]).abs().max().item() for name in single)
        assert changed > 1e-2  # the runs did train
        assert load_file(str(tmp_path / f"main_only_k{k}" / "model.safetensors")).keys() == single.keys()
        fsdp = load_file(str(tmp_path / f"fsdp_k{k}" / "model.safetensors"))
        assert max((fsdp[name] - single[name]).abs().max().item() for name in single) <= 1e-5, ("fsdp", k)
        counts = json.loads((tmp_path / f"allreduce_k{k}.json").read_text())
        assert counts == {"calls": STEPS, "steps": STEPS}  # one gradient all-reduce per optimizer step

    # An asynchronous save written while DDP went on training holds what a synchronous one of its moment holds.
    written = {folder: {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()} for folder in ("ckpt_sync", "ckpt_async")}
    assert {"gradients_0.safetensors", "gradients_1.safetensors", "random_states_1.json"} <= written["ckpt_sync"].keys()
    assert written["ckpt_async"] == written["ckpt_sync"]

    # gather_for_metrics over 101 samples: exactly 101 predictions, in the single-process order.
    gathered = load_file(str(tmp_path / "predictions.safetensors"))
    assert gathered["indices"].tolist() == list(range(101))
    model = make_model()
    x = torch.arange(101 * 6, dtype=torch.float32).view(101, 6) / 600
    with torch.no_grad():
        assert torch.allclose(gathered["predictions"], model(x), atol=1e-6)
