"""Two-process DDP runs whose results the test compares with one process (see test_ddp.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from checks import leave  # noqa: E402
from ddp_setup import STEPS, dataset, make_model, train_steps  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from strategies import DDP, FSDP  # noqa: E402
from trainer import Accelerator, set_seed  # noqa: E402


def train(out: Path, accumulation: int) -> None:
    calls = {"allreduce": 0}

    def counting_hook(state, bucket):
        calls["allreduce"] += 1
        return default_hooks.allreduce_hook(state, bucket)

    set_seed(0)
    accelerator = Accelerator(strategy=DDP(comm_hook=counting_hook, comm_state=None), gradient_accumulation_steps=accumulation)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(dataset(), batch_size=8, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    train_steps(accelerator, model, optimizer, loader)
    steps = STEPS
    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(model).state_dict()
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"ddp_k{accumulation}.safetensors"))
        accelerator.save_model(model, out / f"main_only_k{accumulation}")  # called by the main process alone
        (out / f"allreduce_k{accumulation}.json").write_text(json.dumps({"calls": calls["allreduce"], "steps": steps}))


def train_fsdp(out: Path, accumulation: int) -> None:
    """The same run with parameters, gradients and optimizer state sharded (FSDP), then saved in full."""
    set_seed(0)
    accelerator = Accelerator(strategy=FSDP(auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=100),
                              gradient_accumulation_steps=accumulation)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before prepare, as users do
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(dataset(), batch_size=8, shuffle=True))
    train_steps(accelerator, model, optimizer, loader)
    path = accelerator.save_model(model, out / f"fsdp_k{accumulation}")
    accelerator.wait_for_everyone()
    del path


def uneven(out: Path) -> None:
    """5 batches over 2 processes without padding: rank 0 has 3, rank 1 has 2; join keeps them in step."""
    accelerator = Accelerator(even_batches=False)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.randn(5, 6), torch.randint(0, 3, (5,)))
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=1))
    batches = 0
    with accelerator.join_uneven_inputs([model]):
        for x, y in loader:
            accelerator.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
            batches += 1
    assert batches == (3 if accelerator.process_index == 0 else 2), batches


def predict(out: Path) -> None:
    accelerator = Accelerator()
    model = accelerator.prepare(make_model())
    x = torch.arange(101 * 6, dtype=torch.float32).view(101, 6) / 600
    loader = accelerator.prepare(DataLoader(torch.utils.data.TensorDataset(x, torch.arange(101)), batch_size=8))
    predictions, indices = [], []
    with torch.no_grad():
        for xb, ib in loader:
            gathered = accelerator.gather_for_metrics((model(xb), ib))
            predictions.append(gathered[0])
            indices.append(gathered[1])
    if accelerator.is_main_process:
        save_file({"predictions": torch.cat(predictions), "indices": torch.cat(indices)}, str(out / "predictions.safetensors"))


def async_save(out: Path) -> None:
    """A synchronous and an asynchronous save of the same moment (inside an accumulation group, so each
    process also writes its gradients); DDP keeps training, its all-reduces running beside the writer's
    agreement on its own group. The test compares the two folders byte for byte."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Event

    set_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(dataset(), batch_size=8, shuffle=True))
    train_steps(accelerator, model, optimizer, loader, steps=3)
    batches = iter(loader)
    for _ in range(2):  # two micro-batches into the next group
        x, y = next(batches)
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
    iteration = accelerator.save_iteration
    accelerator.save_state(out / "ckpt_sync")
    accelerator.save_iteration = iteration
    gate = Event()  # the writer starts only once training has gone on
    writer = accelerator.checkpoint_writer
    writer._executor = ThreadPoolExecutor(max_workers=1)
    writer._executor.submit(gate.wait)
    accelerator.save_state(out / "ckpt_async", blocking=False)
    train_steps(accelerator, model, optimizer, loader, steps=2)
    gate.set()
    train_steps(accelerator, model, optimizer, loader, steps=2)
    accelerator.wait_for_checkpoint()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    async_save(out)
    uneven(out)
    predict(out)
    for k in (1, 4):
        train(out, k)
        train_fsdp(out, k)
    print(f"OK rank {os.environ['RANK']}", flush=True)
    leave()
