"""Big-model loading and offloaded inference against the same model fully in memory, in one run.

Writes a sharded safetensors checkpoint (16 square layers of 64 MiB: 1.07 GB in 8 shards), then:

1. loads it in a fresh process, fully in memory and with ``max_memory={"cpu": "300MB"}`` plus disk
   offload, and reports load time and peak resident memory of each;
2. times forward passes of the model fully in memory, and with every layer on disk read back
   without prefetch and with prefetch, and prints the ratios.

Offloaded layers are read with ``pread`` from the checkpoint's own files; right after writing,
those pages are in the OS page cache, so this measures the case where the disk keeps up. One
compute thread (``--threads``) leaves a core for the prefetch thread, as on a machine whose
other cores feed the accelerator. By default the batch is chosen so that computing a layer takes
about as long as reading it (both are measured first): that is where prefetching has the most
to hide, and where it can at best halve the time; ``--batch`` fixes it instead.

    python benchmarks/big_model.py [--batch N] [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from big_model_setup import Stack, write_sharded_stack  # noqa: E402

from trainer import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from trainer.inference import remove_dispatch  # noqa: E402

WIDTH, DEPTH, PER_SHARD = 4096, 16, 2
MEMORY_WORKER = ROOT / "tests" / "workers" / "big_model_memory.py"


def load_in_subprocess(folder: Path, max_cpu: str, scratch: Path, mmap: bool = True, peer: bool = False) -> dict:
    flags = [*([] if mmap else ["--no-mmap"]), *(["--peer"] if peer else [])]
    result = subprocess.run([sys.executable, str(MEMORY_WORKER), str(folder), "--width", str(WIDTH), "--depth", str(DEPTH),
                             "--max-cpu", max_cpu, "--offload-folder", str(scratch / "offload"),
                             "--output", str(scratch / f"out-{max_cpu}-{mmap}-{peer}.safetensors"), *flags],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def forward_times(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    return times


def dispatched(folder: Path, device_map: object, prefetch: int) -> torch.nn.Module:
    with init_empty_weights():
        model = Stack(WIDTH, DEPTH)
    return load_checkpoint_and_dispatch(model, folder, device_map=device_map, prefetch=prefetch)


def balanced_batch(folder: Path, repeats: int) -> int:
    """The batch whose compute time equals the time reading the weights adds to a forward pass.

    Both are measured: the forward time per row fully in memory, and what a forward with every
    layer on disk and no prefetch takes on top of the in-memory one.
    """
    rows = 32
    x = torch.randn(rows, WIDTH)
    times = {}
    for label, device_map in (("memory", {"": "cpu"}), ("disk", {"": "disk"})):
        model = dispatched(folder, device_map, prefetch=0)
        times[label] = statistics.median(forward_times(model, x, repeats))
        remove_dispatch(model)
    reading = max(times["disk"] - times["memory"], 0.0)
    return max(1, round(reading / (times["memory"] / rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=0, help="rows per forward; 0: compute time equal to read time")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="big-model-") as scratch_dir:
        scratch = Path(scratch_dir)
        started = time.perf_counter()
        folder = write_sharded_stack(scratch / "checkpoint", WIDTH, DEPTH, PER_SHARD)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(folder.glob('*.safetensors')))} shards "
              f"(written in {time.perf_counter() - started:.1f} s); torch {torch.__version__}, {args.threads} thread(s)")

        full = load_in_subprocess(folder, "64GB", scratch)
        copied = load_in_subprocess(folder, "64GB", scratch, mmap=False)
        budget = load_in_subprocess(folder, "300MB", scratch)
        print(f"{'load':<36}{'seconds':>9}{'peak RSS+ load':>16}{'+ forward':>11}{'own memory+':>13}  (MB; own: RssAnon)")
        for label, row in (("all on the CPU, mapped (default)", full), ("all on the CPU, copied (mmap=False)", copied),
                           ("max_memory cpu 300MB + disk", budget)):
            print(f"{label:<36}{row['load_seconds']:>9.2f}{row['load_peak_increase'] / 1e6:>16.0f}"
                  f"{row['peak_increase'] / 1e6:>11.0f}{row['anonymous_increase'] / 1e6:>13.0f}")
        print(f"all on the CPU: load peak / model size {full['load_peak_increase'] / size:.2f} mapped, "
              f"{copied['load_peak_increase'] / size:.2f} copied (target <= 0.3); own memory after a forward "
              f"{full['anonymous_increase'] / size:.2f} of the model size; load time mapped / copied "
              f"{full['load_seconds'] / copied['load_seconds']:.2f}; {budget['on_disk']} of {DEPTH} layers on disk "
              "under the 300MB budget")
        if importlib.util.find_spec("accelerate") is not None:  # make bench-peer
            peer = load_in_subprocess(folder, "64GB", scratch, peer=True)
            print(f"Accelerate, all on the CPU: {peer['load_seconds']:.2f} s, peak RSS+ load "
                  f"{peer['load_peak_increase'] / 1e6:.0f} MB, own memory+ {peer['anonymous_increase'] / 1e6:.0f} MB; "
                  f"project / Accelerate: load time {full['load_seconds'] / peer['load_seconds']:.2f}, load peak "
                  f"{full['load_peak_increase'] / max(peer['load_peak_increase'], 1):.2f}")

        batch = args.batch or balanced_batch(folder, args.repeats)
        x = torch.randn(batch, WIDTH, generator=torch.Generator().manual_seed(0))
        results = {}
        for label, device_map, prefetch in (("in memory", {"": "cpu"}, 0), ("disk, no prefetch", {"": "disk"}, 0),
                                            (f"disk, prefetch {args.prefetch}", {"": "disk"}, args.prefetch)):
            model = dispatched(folder, device_map, prefetch)
            results[label] = statistics.median(forward_times(model, x, args.repeats))
            remove_dispatch(model)
            del model
        memory = results["in memory"]
        no_prefetch = results["disk, no prefetch"]
        with_prefetch = results[f"disk, prefetch {args.prefetch}"]
        print(f"\n{'forward, batch ' + str(batch):<36}{'median':>10}{'vs in memory':>16}")
        for label, seconds in results.items():
            print(f"{label:<36}{seconds * 1e3:>8.1f}ms{seconds / memory:>16.2f}")
        print(f"\nprefetch / no prefetch: {with_prefetch / no_prefetch:.2f} (target <= 0.6); "
              f"prefetch / in memory: {with_prefetch / memory:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
