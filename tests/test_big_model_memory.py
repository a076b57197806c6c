"""A sharded checkpoint of over 1 GB, loaded under a 300 MB CPU budget with disk offload, stays within it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from big_model_setup import write_sharded_stack
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "workers" / "big_model_memory.py"
WIDTH, DEPTH, PER_SHARD = 4096, 16, 2  # 16 layers of 64 MiB: 1.07 GB in 8 shards of 128 MiB
MB = 10**6
MARGIN = 100 * MB  # the interpreter's own allocations, activations, allocator slack


def reference_output(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """The model's output computed shard by shard (the whole model never in memory at once)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        tensors = load_file(str(folder / shard))
        for layer in sorted({int(name.split(".")[1]) for name in tensors}):
            x = torch.tanh(torch.nn.functional.linear(x, tensors[f"layers.{layer}.weight"], tensors[f"layers.{layer}.bias"]))
    return x


@pytest.mark.slow
def test_peak_memory_stays_within_the_budget_plus_one_shard(tmp_path):
    folder = write_sharded_stack(tmp_path / "checkpoint", WIDTH, DEPTH, PER_SHARD)
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    largest_shard = max(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert total >= 10**9
    result = subprocess.run([sys.executable, str(WORKER), str(folder), "--width", str(WIDTH), "--depth", str(DEPTH),
                             "--max-cpu", "300MB", "--offload-folder", str(tmp_path / "offload"),
                             "--output", str(tmp_path / "output.safetensors")],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == ["cpu", "disk"] and report["on_disk"] > 0
    bound = 300 * MB + largest_shard + MARGIN
    assert report["peak_increase"] < bound, (report, bound)
    print(f"peak increase {report['peak_increase'] / MB:.0f} MB (bound {bound / MB:.0f} MB), load {report['load_seconds']:.2f} s")
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_file(str(tmp_path / "output.safetensors"))["output"], reference_output(folder, x))
    assert not (tmp_path / "offload").exists() or not list((tmp_path / "offload").iterdir())  # read in place
