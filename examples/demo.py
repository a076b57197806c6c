"""The demo behind ``make demo``: train on the CPU with a progress bar, checkpoint, resume, evaluate.

It runs the talk's low-code loop (see ``low_code_loop.py``) with gradient accumulation and
bf16 autocast, writes a full training state with ``save_state`` after each epoch, restarts
from the last one as a crashed job would, and checks the reloaded weights on held-out data.

    python examples/demo.py --output-dir outputs/demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import disable_progress_bars, load_dataset
from safetensors.torch import load_model
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from low_code_loop import make_model, to_pairs, write_my_dataset  # noqa: E402

from trainer import Accelerator, PartialState, set_seed  # noqa: E402


def build(accelerator: Accelerator, data_dir: Path, batch_size: int):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    dataset = load_dataset(str(data_dir), split="train").with_format("torch")
    loader = torch.utils.data.DataLoader(dataset, shuffle=True, batch_size=batch_size, collate_fn=to_pairs)
    return accelerator.prepare(model, optimizer, loader, scheduler)


def run_epochs(accelerator, model, optimizer, loader, scheduler, epochs: range, checkpoints: Path) -> Path:
    last = checkpoints
    for epoch in epochs:
        # A live bar on a terminal; one line per epoch in a log file.
        live = accelerator.is_local_main_process and sys.stderr.isatty()
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not live, leave=True)
        for source, targets in bar:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(source), targets)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        last = accelerator.save_state(checkpoints / f"epoch_{epoch}")
        if not live:
            accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}, lr {scheduler.get_last_lr()[0]:.2e}, saved {last.name}")
    return last


def accuracy(model: torch.nn.Module, data_dir: Path) -> float:
    rows = load_dataset(str(data_dir), split="train").with_format("torch")
    source, targets = to_pairs(list(rows))
    with torch.no_grad():
        return (model(source).argmax(-1) == targets).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    disable_progress_bars()  # the dataset is tiny; its progress bars would only add noise
    out = args.output_dir.resolve()
    train_dir = write_my_dataset(out / "data" / "train", samples=768, seed=0)
    test_dir = write_my_dataset(out / "data" / "test", samples=256, seed=1)
    checkpoints = out / "checkpoints"

    set_seed(0)
    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)
    objects = build(accelerator, train_dir, batch_size=32)
    half = args.epochs // 2
    run_epochs(accelerator, *objects, epochs=range(half), checkpoints=checkpoints)
    accelerator.print(f"stopping after epoch {half - 1} as a crashed job would")

    # A new process would start here: build everything again, load the last state, continue.
    accelerator.free_memory()
    PartialState._reset_state()
    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)
    model, optimizer, loader, scheduler = build(accelerator, train_dir, batch_size=32)
    resumed_from = accelerator.load_state(checkpoints / f"epoch_{half - 1}")
    accelerator.print(f"resumed from {resumed_from}")
    last = run_epochs(accelerator, model, optimizer, loader, scheduler, range(half, args.epochs), checkpoints)
    weights = accelerator.save_model(model, out / "model")

    reloaded = make_model()
    load_model(reloaded, str(weights))
    accelerator.print(f"held-out accuracy of the saved model: {accuracy(reloaded, test_dir):.3f}")
    accelerator.print("outputs:")
    accelerator.print(f"  data:        {out / 'data'}")
    accelerator.print(f"  checkpoints: {checkpoints} (last: {last.name})")
    accelerator.print(f"  model:       {weights}")


if __name__ == "__main__":
    main()
