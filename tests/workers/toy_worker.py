"""Launched by `trainer launch --config_file toy.yaml`: trains with the strategy the configuration names."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
from checks import expect, leave, say  # noqa: E402
from ddp_setup import dataset, make_model, train_steps  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from trainer import Accelerator, set_seed  # noqa: E402


def main(out: Path) -> None:
    set_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=2)  # strategy and its options: from the configuration
    strategy = accelerator.strategy
    expect(type(strategy).__name__, "Toy", "strategy class")
    expect((strategy.reduce, strategy.broadcast_from), ("mean", 1), "options from the toy_config section")
    expect(accelerator.num_processes, 2, "processes")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(dataset(), batch_size=8, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    train_steps(accelerator, model, optimizer, loader)
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "toy.safetensors"))
    say(f"TOY rank {accelerator.process_index} OK")
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    leave()
