"""Per-step overhead of the Accelerator over a plain PyTorch loop, measured in one run.

A small MLP on the CPU (about 1 ms per step) is trained by two loops that differ only in the
lines the Accelerator adds: the plain loop and the prepared loop. Epochs of the two alternate
so that drift of the machine's speed affects both alike; the printed figure is the ratio of the
median step times (target: <= 1.01).

    python benchmarks/overhead.py [--rounds 30] [--steps 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer import Accelerator, PartialState  # noqa: E402


def make(seed: int, width: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(128, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 10))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def loader(steps: int, batch: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch, 128, generator=generator)
    y = torch.randint(0, 10, (steps * batch,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def plain_epoch(model, optimizer, data, times: list[float]) -> None:
    start = time.perf_counter()
    for x, y in data:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        times.append(now - start)
        start = now


def accelerated_epoch(accelerator, model, optimizer, data, times: list[float]) -> None:
    start = time.perf_counter()
    for x, y in data:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        now = time.perf_counter()
        times.append(now - start)
        start = now


def accumulate_epoch(accelerator, model, optimizer, data, times: list[float]) -> None:
    start = time.perf_counter()
    for x, y in data:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        now = time.perf_counter()
        times.append(now - start)
        start = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="alternating epochs of each loop")
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    plain_model, plain_opt = make(0, args.width)
    plain_data = loader(args.steps, args.batch)

    accelerator = Accelerator(cpu=True)
    model, optimizer = make(0, args.width)
    model, optimizer, data = accelerator.prepare(model, optimizer, loader(args.steps, args.batch))

    PartialState._reset_state()
    accumulating = Accelerator(cpu=True, gradient_accumulation_steps=1)
    acc_model, acc_opt = make(0, args.width)
    acc_model, acc_opt, acc_data = accumulating.prepare(acc_model, acc_opt, loader(args.steps, args.batch))

    loops = {
        "plain": lambda out: plain_epoch(plain_model, plain_opt, plain_data, out),
        "accelerator": lambda out: accelerated_epoch(accelerator, model, optimizer, data, out),
        "accumulate": lambda out: accumulate_epoch(accumulating, acc_model, acc_opt, acc_data, out),
    }
    for _ in range(3):  # warm-up
        for run in loops.values():
            run([])
    times: dict[str, list[float]] = {name: [] for name in loops}
    round_ratios = []
    for index in range(args.rounds):
        # Alternate the order each round so that neither loop always runs on a warmer cache.
        order = list(loops) if index % 2 == 0 else list(reversed(loops))
        this_round: dict[str, list[float]] = {name: [] for name in loops}
        for name in order:
            loops[name](this_round[name])
            times[name] += this_round[name]
        round_ratios.append(statistics.median(this_round["accelerator"]) / statistics.median(this_round["plain"]))

    base = statistics.median(times["plain"])
    print(f"torch {torch.__version__}, {args.threads} thread(s), MLP width {args.width}, batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'loop':<34}{'median step':>14}{'ratio':>9}")
    print(f"{'plain PyTorch':<34}{base * 1e3:>11.3f} ms{1.0:>9.3f}")
    labels = {"accelerator": "Accelerator (prepare + backward)", "accumulate": "Accelerator + accumulate(k=1)"}
    for name, label in labels.items():
        median = statistics.median(times[name])
        print(f"{label:<34}{median * 1e3:>11.3f} ms{median / base:>9.3f}")
    ratio = statistics.median(times["accelerator"]) / base
    print(f"median step-time ratio Accelerator / plain: {ratio:.4f} (target <= 1.01); "
          f"median of per-round ratios: {statistics.median(round_ratios):.4f}")

if __name__ == "__main__":
    main()
