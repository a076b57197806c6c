"""Checkpoint writes and reads against what the disk itself does, in one run.

1. The disk: a plain sequential write of a file the size of the state (large writes from one
   buffer, then ``fsync``), and reads of it into memory, cold (its pages dropped from the page
   cache first) and warm.
2. ``accelerator.save_state`` of a state of that size (an MLP's weights and its AdamW moments:
   three times the weights), which syncs its files to the disk before they count, and
   ``load_state`` of it, cold and warm; each as throughput and as a ratio of the disk's.
3. Training step time with no save, with a synchronous and with an asynchronous save every N
   steps, and how long each save holds the training loop.
4. Where Accelerate is installed (``make bench-peer``), Accelerate's own save_state and
   load_state of the same state, and the time ratios.

The page cache is emptied for the cold reads with ``posix_fadvise(DONTNEED)`` on each file
(after ``fsync``, so the pages are clean and really dropped).

    python benchmarks/checkpoint_io.py [--gb 1.0] [--dir /path/on/the/disk] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from page_cache import drop_cache  # noqa: E402

from trainer import Accelerator, PartialState  # noqa: E402

CHUNK = 64 * 2**20


def disk_write(path: Path, size: int) -> float:
    buffer = memoryview(bytearray(os.urandom(2**20) * (CHUNK // 2**20)))
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < size:
            written += os.write(fd, buffer[: min(CHUNK, size - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def disk_read(path: Path) -> float:
    buffer = memoryview(bytearray(CHUNK))
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buffer]):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - started


def mlp_state(gb: float, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP of about ``gb / 4`` GB of fp32 weights and its AdamW (the moments make the state ``gb``)."""
    width = 4096
    depth = max(1, round(gb * 1e9 / 4 / (width * width * 4)))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(depth)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One training step (it fills AdamW's moments); returns the batch used."""
    x = torch.randn(8, model[0].in_features, generator=torch.Generator().manual_seed(0))
    F.mse_loss(model(x), x).backward()
    optimizer.step()
    optimizer.zero_grad()
    return x


def build(gb: float, seed: int = 0):
    """The MLP state, prepared by this project's Accelerator, after one step."""
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(*mlp_state(gb, seed))
    x = one_step(model, optimizer)
    return accelerator, model, optimizer, x


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def step_times(accelerator, model, optimizer, x, steps: int, save_every: int | None, folder: Path,
               blocking: bool = True) -> tuple[list[float], list[float]]:
    """(every step's time, the time each save held the loop); saves every ``save_every`` steps."""
    times, held = [], []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        F.mse_loss(model(x), x).backward()
        optimizer.step()
        optimizer.zero_grad()
        if save_every and step % save_every == 0:
            asked = time.perf_counter()
            accelerator.save_state(folder / "ckpt", blocking=blocking)
            held.append(time.perf_counter() - asked)
        times.append(time.perf_counter() - started)
    accelerator.wait_for_checkpoint()
    return times, held


def compare_with_accelerate(args: argparse.Namespace, scratch: Path, save: list[float], load_cold: list[float],
                            load_warm: list[float]) -> None:
    """Accelerate's save_state and load_state of the same state, in a process of its own (Accelerate installed)."""
    worker = Path(__file__).resolve().parent / "peer_checkpoint.py"
    done = subprocess.run([sys.executable, str(worker), "--gb", str(args.gb), "--dir", str(scratch),
                           "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"Accelerate {peer['version']} (its files {peer['bytes'] / 1e9:.2f} GB, no fsync): save "
          f"{statistics.median(peer['save']):.2f} s, load cold {statistics.median(peer['load_cold']):.2f} s, "
          f"warm {statistics.median(peer['load_warm']):.2f} s")
    print(f"project / Accelerate, time: save {statistics.median(save) / statistics.median(peer['save']):.2f}, "
          f"load cold {statistics.median(load_cold) / statistics.median(peer['load_cold']):.2f}, "
          f"warm {statistics.median(load_warm) / statistics.median(peer['load_warm']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the training state (weights + AdamW moments)")
    parser.add_argument("--dir", type=Path, default=None, help="a folder on the disk to measure (default: the temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="checkpoint-io-", dir=args.dir) as scratch_dir:
        scratch = Path(scratch_dir)
        accelerator, model, optimizer, x = build(args.gb)
        accelerator.save_state(scratch / "ckpt")
        size = folder_bytes(scratch / "ckpt")

        plain = scratch / "plain.bin"
        write, cold, warm = [], [], []
        for _ in range(args.repeats):
            write.append(disk_write(plain, size))
            drop_cache(plain)
            cold.append(disk_read(plain))
            warm.append(disk_read(plain))
        plain.unlink()

        save, load_cold, load_warm = [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            accelerator.save_state(scratch / "ckpt")
            save.append(time.perf_counter() - started)
            drop_cache(scratch / "ckpt")
            started = time.perf_counter()
            accelerator.load_state(scratch / "ckpt")
            load_cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            accelerator.load_state(scratch / "ckpt")
            load_warm.append(time.perf_counter() - started)

        def rate(seconds: list[float]) -> float:
            return size / statistics.median(seconds) / 1e9

        print(f"state: {size / 1e9:.2f} GB in {len(list((scratch / 'ckpt').iterdir()))} files, under {scratch.parent}; "
              f"torch {torch.__version__}; median of {args.repeats}")
        print(f"{'':<34}{'GB/s':>8}{'of the disk':>14}")
        rows = [("disk: write + fsync", rate(write), None), ("save_state (synced)", rate(save), rate(write)),
                ("disk: read, cold", rate(cold), None), ("load_state, cold", rate(load_cold), rate(cold)),
                ("disk: read, warm", rate(warm), None), ("load_state, warm", rate(load_warm), rate(warm))]
        for label, value, disk in rows:
            print(f"{label:<34}{value:>8.2f}{'' if disk is None else f'{value / disk:>14.2f}'}")
        print(f"save_state / disk write {rate(save) / rate(write):.2f} (target >= 0.8); load_state / disk read: "
              f"cold {rate(load_cold) / rate(cold):.2f}, warm {rate(load_warm) / rate(warm):.2f} (target >= 0.8)")

        if importlib.util.find_spec("accelerate") is not None:
            compare_with_accelerate(args, scratch, save, load_cold, load_warm)

        quiet = statistics.median(step_times(accelerator, model, optimizer, x, args.steps, None, scratch)[0])
        synced, sync_held = step_times(accelerator, model, optimizer, x, args.steps, args.save_every, scratch)
        background, async_held = step_times(accelerator, model, optimizer, x, args.steps, args.save_every, scratch,
                                            blocking=False)
        print(f"step time {quiet * 1e3:.1f} ms without saves; a save every {args.save_every} of {args.steps} steps "
              f"(training on 1 thread, the writer on another core):")
        for label, times, held in (("synchronous", synced, sync_held), ("asynchronous", background, async_held)):
            print(f"  {label:<13} median step {statistics.median(times) / quiet:.3f} x; each save held the loop "
                  f"{', '.join(f'{h:.2f}' for h in held)} s")
        print(f"asynchronous: median step / no saves {statistics.median(background) / quiet:.3f} (target <= 1.1); "
              f"loop held per save / a synchronous save {statistics.median(async_held) / statistics.median(sync_held):.3f} "
              "(target <= 0.1; the first asynchronous save also allocates its staging buffers)")


if __name__ == "__main__":
    main()
