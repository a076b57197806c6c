"""Loads a sharded checkpoint under a CPU budget with disk offload, runs it, and reports its peak memory.

The peak resident memory is reported for the load alone and with one forward pass (which touches
every weight: mapped file pages then count too), and the growth of the process's own memory
(RssAnon, which mapped file pages are not).

Run in its own process so that the peak belongs to this load alone; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import psutil  # noqa: E402
import torch  # noqa: E402
from big_model_setup import Stack  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from trainer import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402


def high_water_mark() -> int:
    """The kernel's peak RSS of this process (VmHWM); 0 where /proc does not have it.

    Not ru_maxrss: Linux carries that over from the parent across fork and exec, so a child of a
    large pytest process would report the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return 0


def anonymous_memory() -> int:
    """This process's resident memory of its own (RssAnon), not counting mapped file pages; 0 without /proc."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) * 1024
    except (OSError, StopIteration):
        return 0


def reset_high_water_mark() -> None:
    try:  # Linux: the high-water mark restarts from the current RSS
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass  # the sampler alone then


class PeakSampler:
    """Samples this process's resident memory every millisecond, beside the kernel's high-water mark."""

    def __init__(self) -> None:
        reset_high_water_mark()
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, high_water_mark())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--max-cpu", required=True)
    parser.add_argument("--offload-folder", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--no-mmap", action="store_true", help="read CPU weights into memory of their own")
    parser.add_argument("--peer", action="store_true", help="load with Accelerate's functions (benchmarks only)")
    args = parser.parse_args()
    if args.peer:
        import accelerate

        empty, load = accelerate.init_empty_weights, accelerate.load_checkpoint_and_dispatch
        options = {}
    else:
        empty, load = init_empty_weights, load_checkpoint_and_dispatch
        options = {"mmap": not args.no_mmap}
    torch.set_num_threads(1)
    with empty():
        model = Stack(args.width, args.depth)
    x = torch.randn(4, args.width, generator=torch.Generator().manual_seed(0))
    baseline, anonymous = psutil.Process().memory_info().rss, anonymous_memory()
    sampler = PeakSampler()
    started = time.perf_counter()
    model = load(model, args.checkpoint, device_map="auto", max_memory={"cpu": args.max_cpu},
                 offload_folder=args.offload_folder, **options)
    loaded = time.perf_counter() - started
    load_peak = max(sampler.peak, high_water_mark())
    with torch.no_grad():
        output = model(x)
    peak = sampler.stop()
    save_file({"output": output}, str(args.output))
    devices = sorted(set(map(str, model.hf_device_map.values())))
    print(json.dumps({"baseline": baseline, "peak_increase": peak - baseline, "load_peak_increase": load_peak - baseline,
                      "anonymous_increase": anonymous_memory() - anonymous, "load_seconds": loaded, "devices": devices,
                      "on_disk": sum(1 for d in model.hf_device_map.values() if d == "disk")}))


if __name__ == "__main__":
    main()
