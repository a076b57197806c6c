"""What the fault catalogue (``tests/test_faults_*.py``) shares: a saved checkpoint and the check that it still loads.

Each catalogue case asserts the error type, that the message names the problem (file, key, step
or flag) and the fix, and, where files are involved, that the checkpoint saved before the fault
still loads with the same weights (``assert_still_loads``). Every test in those files is one case
and is listed by its name in docs/troubleshooting.md (tests/test_docs.py checks this).
"""

from __future__ import annotations

from pathlib import Path

import torch
from models import classification_data, mlp

from trainer import Accelerator


def prepared(seed: int = 0, **accelerator_args):
    """A fresh Accelerator with a small model, optimizer, scheduler and loader prepared."""
    from torch.utils.data import DataLoader, TensorDataset

    accelerator = Accelerator(cpu=True, **accelerator_args)
    model = mlp(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    x, y = classification_data(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    return accelerator, model, optimizer, scheduler, loader


def train_steps(accelerator, model, optimizer, scheduler, loader, steps: int = 2) -> None:
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def saved_checkpoint(directory: Path, steps: int = 2) -> tuple[Path, dict[str, torch.Tensor]]:
    """Train a little, save the state to ``directory / "ckpt"``; return it and the saved weights."""
    from trainer import PartialState

    parts = prepared()
    train_steps(*parts, steps=steps)
    accelerator, model = parts[0], parts[1]
    path = Path(directory) / "ckpt"
    accelerator.save_state(path)
    weights = {name: value.detach().clone() for name, value in accelerator.unwrap_model(model).state_dict().items()}
    PartialState._reset_state()
    return path, weights


def assert_still_loads(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """The checkpoint at ``path`` loads into a fresh setup and holds exactly ``weights``."""
    from trainer import PartialState

    PartialState._reset_state()
    accelerator, model, *_ = prepared(seed=5)
    accelerator.load_state(path)
    loaded = accelerator.unwrap_model(model).state_dict()
    assert loaded.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(loaded[name], value), f"{name} changed in {path}"
    PartialState._reset_state()


# -- a Trainer run's output folder (the fixtures finished_run and run_dir are in conftest.py) --------
def assert_resumable(out: Path, name: str = "epoch=0-step=5") -> None:
    """``latest`` in ``out`` still names ``name`` and a fresh Trainer resumes from it with finite weights."""
    from trainer_setup import make_trainer

    from trainer import PartialState

    assert (out / "checkpoints" / "latest").read_text().strip() == name
    PartialState._reset_state()
    trainer = make_trainer(out, max_epochs=1, trackers=[])
    trainer._resume("latest")
    assert trainer.global_step > 0 and trainer.weights_are_finite()
    PartialState._reset_state()
