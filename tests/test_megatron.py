"""Megatron tensor parallelism (TP=2) on two CPU processes (gloo) equals the dense model on one.

The two-process run (tests/workers/megatron_worker.py) starts once for the module: 20 AdamW
steps of a transformer block whose attention and MLP are split over two ranks, a checkpoint at
step 10 and a resumed run. Each test reads what it wrote. Only the missing-package test runs
without megatron-core installed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import WORKERS_DIR, import_errors_without, run_distributed
from safetensors.torch import load_file

from strategies import Megatron, resolve_strategy
from strategies.megatron import PACKAGE as MEGATRON

needs_megatron = pytest.mark.skipif(
    not MEGATRON.available(), reason="megatron-core is not installed (pip install 'trainer-kit[megatron]')")
INSTALL = "pip install 'trainer-kit[megatron]'"
ABORT_SIGNS = ("terminate called", "Aborted", "core dumped", "Segmentation fault", "Fatal Python error")

sys.path.insert(0, str(WORKERS_DIR))
import megatron_worker as worker  # noqa: E402


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("megatron")
    result = run_distributed(WORKERS_DIR / "megatron_worker.py", nproc=2, args=[str(out)], timeout=180)
    assert "OK rank 0" in result.stdout and "OK rank 1" in result.stdout
    assert not any(sign in result.stderr for sign in ABORT_SIGNS), result.stderr[-3000:]
    deadline = time.monotonic() + 10
    while True:
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"
    return out


@pytest.fixture(scope="module")
def dense() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers ran (OMP_NUM_THREADS=1)
    try:
        return worker.dense_run()
    finally:
        torch.set_num_threads(threads)


@needs_megatron
def test_tensor_parallel_block_on_two_processes_equals_the_dense_model(runs, dense):
    gathered = load_file(str(runs / "straight" / "model.safetensors"))
    diff = max_diff(gathered, dense)
    print(f"TP=2 vs dense after {worker.STEPS} AdamW steps: max abs diff {diff:.3g}")
    assert diff <= 1e-5, diff
    assert max_diff(dense, worker.dense_model().state_dict()) > 1e-2  # the runs did train
    for rank in (0, 1):  # each rank held half of every split weight
        shapes = json.loads((runs / f"shapes_rank{rank}.json").read_text())
        assert shapes["qkv.weight"] == [3 * worker.HIDDEN // 2, worker.HIDDEN]
        assert shapes["proj.weight"] == [worker.HIDDEN, worker.HIDDEN // 2]
        assert shapes["fc2.weight"] == [worker.HIDDEN, 2 * worker.HIDDEN] and shapes["fc2.bias"] == [worker.HIDDEN]


@needs_megatron
def test_save_at_step_10_and_resume_equals_the_uninterrupted_run_exactly(runs):
    resumed = load_file(str(runs / "resumed" / "model.safetensors"))
    straight = load_file(str(runs / "straight" / "model.safetensors"))
    assert max_diff(resumed, straight) == 0.0
    checkpoint = runs / "checkpoint_10"
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".safetensors"}, files
    slices = [load_file(str(checkpoint / "megatron" / f"tp_rank_{rank}.safetensors")) for rank in (0, 1)]
    weight = "models.0.fc1.weight"
    assert slices[0][weight].shape == (2 * worker.HIDDEN, worker.HIDDEN)  # a slice, not the full weight
    assert not torch.equal(slices[0][weight], slices[1][weight])


@needs_megatron
def test_the_gradient_norm_counts_every_slice_and_every_whole_weight_once(runs, dense):
    norms = json.loads((runs / "norms.json").read_text())
    model = worker.dense_model()
    model.load_state_dict(dense)
    x, y = worker.dataset()[: worker.BATCH]
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    expected = torch.nn.utils.get_total_norm(grads).item()
    assert abs(norms["tp"] - expected) <= 1e-5 * expected, (norms, expected)
    assert abs(norms["tp_inf"] - max(g.abs().max().item() for g in grads)) <= 1e-5
    assert norms["zero"] == 0.0


@needs_megatron
def test_the_launch_section_maps_onto_the_strategy(monkeypatch):
    section = {"megatron_lm_tp_degree": 2, "megatron_lm_pp_degree": 1, "megatron_lm_num_micro_batches": 2,
               "megatron_lm_sequence_parallelism": True, "megatron_lm_recompute_activations": True,
               "megatron_lm_use_distributed_optimizer": False, "megatron_lm_gradient_clipping": 1.0}
    strategy = Megatron.from_config(section)
    assert (strategy.tp_degree, strategy.pp_degree, strategy.num_micro_batches, strategy.sequence_parallelism,
            strategy.recompute_activations, strategy.use_distributed_optimizer, strategy.gradient_clipping) == (
        2, 1, 2, True, True, False, 1.0)
    monkeypatch.setenv("TRAINER_MEGATRON_LM_CONFIG", json.dumps({"megatron_lm_tp_degree": 2}))
    from strategies.registry import launch_settings

    resolved = resolve_strategy("megatron", 2, launch_settings())
    assert isinstance(resolved, Megatron) and resolved.tp_degree == 2
    with pytest.raises(ValueError, match="Did you mean 'megatron_lm_tp_degree'"):
        Megatron.from_config({"megatron_lm_tp_degre": 2})
    with pytest.raises(ValueError, match="pipeline parallelism is not supported"):
        Megatron.from_config({"megatron_lm_pp_degree": 2})
    with pytest.raises(ValueError, match=r"use_distributed_optimizer=True\) is not supported"):
        Megatron(use_distributed_optimizer=True)
    with pytest.raises(ValueError, match="divisible by 2; this job runs 3"):
        Megatron(tp_degree=2).setup_environment(torch.device("cpu"), 0, 3)


ATTEMPTS = (
    "from trainer import Accelerator; Accelerator(strategy='megatron')",
    "from strategies import Megatron; Megatron(tp_degree=2)",
    "from trainer import Trainer; import torch; Trainer(torch.nn.Linear(2, 2), strategy='megatron')",
)


def test_a_missing_megatron_core_is_one_clear_error_before_any_work(tmp_path):
    errors = import_errors_without("megatron", ATTEMPTS, tmp_path)
    assert len(errors) == 3, errors
    for line in errors:
        assert line.startswith("ERROR ImportError ") and INSTALL in line and line.endswith("process group: False"), line
