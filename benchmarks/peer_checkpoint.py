"""Accelerate's save_state and load_state of the state that checkpoint_io.py measures, in a process of its own.

Run by checkpoint_io.py where Accelerate is installed (``make bench-peer``); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_io import folder_bytes, mlp_state, one_step  # noqa: E402
from page_cache import drop_cache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, required=True)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import accelerate

    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(*mlp_state(args.gb))
    one_step(model, optimizer)
    times: dict[str, list[float]] = {"save": [], "load_cold": [], "load_warm": []}
    with tempfile.TemporaryDirectory(prefix="peer-", dir=args.dir) as scratch:
        folder = Path(scratch) / "ckpt"
        for _ in range(args.repeats):
            started = time.perf_counter()
            accelerator.save_state(str(folder))
            times["save"].append(time.perf_counter() - started)
            drop_cache(folder)
            for kind in ("load_cold", "load_warm"):
                started = time.perf_counter()
                accelerator.load_state(str(folder))
                times[kind].append(time.perf_counter() - started)
        print(json.dumps({**times, "bytes": folder_bytes(folder), "version": accelerate.__version__}))


if __name__ == "__main__":
    main()
