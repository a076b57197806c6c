"""What checking a checkpoint against its manifest costs: ``load_state`` of a ~1 GB checkpoint, with and without.

Saves a model of square layers (64 MiB each; 15 of them for the default 1 GB) with ``save_state``,
then times, in the same run, with the modes in a rotating order so that each follows every other:

- reading every file of the checkpoint once (the disk's own speed, the floor for any load);
- checking the checksums alone (what ``load_state()`` does first);
- ``load_state(verify=False)``;
- ``load_state()`` (checksums first, then the load).

Each is timed cold (the files dropped from the page cache with ``posix_fadvise``, as after a
reboot or on another machine) and warm (right after another read, as when resuming at once). The
ratio of the two loads is the price of the check; GB/s is the checkpoint's size over the time.

    python benchmarks/bench_checkpoint_verify.py [--gb 1.0] [--repeats 4] [--folder DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from page_cache import drop_cache  # noqa: E402

from trainer import Accelerator  # noqa: E402
from trainer.checkpoint_manifest import checkpoint_files, verify_checkpoint, write_manifest  # noqa: E402

LAYER = 4096  # a 4096 x 4096 float32 layer: 64 MiB


def checkpoint_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in checkpoint_files(folder))


def read_all(folder: Path) -> None:
    buffer = bytearray(8 * 2**20)
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb", buffering=0) as file:
                while file.readinto(buffer):
                    pass


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (default 1)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--folder", type=Path, default=None, help="where to write it (default: a temporary folder)")
    args = parser.parse_args()

    layers = max(1, round(args.gb * 1e9 / (LAYER * LAYER * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(LAYER, LAYER, bias=False) for _ in range(layers)])
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    with tempfile.TemporaryDirectory(dir=args.folder) as scratch:
        path = Path(scratch) / "ckpt"
        save_s = timed(lambda: accelerator.save_state(path))
        size = checkpoint_bytes(path)
        manifest_s = timed(lambda: write_manifest(path))  # the hashing part of the save (files in the page cache)
        gb = size / 1e9
        print(f"checkpoint: {gb:.3f} GB in {path} ({layers} layers); save_state {save_s:.2f} s, of which writing the "
              f"manifest (hashing, warm) {manifest_s:.2f} s = {gb / manifest_s:.1f} GB/s")

        modes: dict[str, Callable[[], object]] = {
            "read the files (disk baseline)": lambda: read_all(path),
            "checksums alone": lambda: verify_checkpoint(path, 0, 1, lambda value: [value]),
            "load_state(verify=False)": lambda: accelerator.load_state(path, verify=False),
            "load_state() (verified)": lambda: accelerator.load_state(path),
        }
        results: dict[tuple[str, str], list[float]] = {}
        names = list(modes)
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[: repeat % len(names)]  # each mode in every position in turn
            for cache in ("cold", "warm"):
                for mode in order:
                    run = modes[mode]
                    if cache == "cold":
                        drop_cache(path)
                    else:
                        read_all(path)
                    results.setdefault((cache, mode), []).append(timed(run))

        print(f"\nmedian of {args.repeats} (the modes in a rotating order)")
        print(f"{'cache':6} {'what':34} {'seconds':>8} {'GB/s':>7}")
        for (cache, mode), times in sorted(results.items(), key=lambda item: (item[0][0], names.index(item[0][1]))):
            median = statistics.median(times)
            print(f"{cache:6} {mode:34} {median:8.2f} {gb / median:7.2f}   ({' '.join(f'{t:.2f}' for t in times)})")
        for cache in ("cold", "warm"):
            plain = statistics.median(results[(cache, "load_state(verify=False)")])
            checked = statistics.median(results[(cache, "load_state() (verified)")])
            print(f"{cache}: verified / unverified load = {checked / plain:.2f} ({checked - plain:+.2f} s)")


if __name__ == "__main__":
    main()
