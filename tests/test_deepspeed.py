"""DeepSpeed ZeRO 1-3 on two CPU processes (gloo) equals one process on the same global batch.

The two-process runs (tests/workers/deepspeed_worker.py) start once for the module; each test
reads what they wrote. The first run on a machine builds DeepSpeed's small CPU communication op
(about a minute and a half on two cores, cached afterwards under ~/.cache/torch_extensions).
Only the missing-package test runs without deepspeed installed.
"""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from ddp_setup import dataset, make_model, train_steps
from distributed_helpers import WORKERS_DIR, import_errors_without, run_cli, run_distributed
from safetensors.torch import load_file, load_model
from torch.utils.data import DataLoader

from strategies import DeepSpeed, resolve_strategy
from strategies.deepspeed import PACKAGE as DEEPSPEED
from strategies.deepspeed_checkpoint import _my_part
from strategies.state_format import open_state, save_state_files
from trainer import Accelerator, PartialState, set_seed
from trainer.accumulation import GradientAccumulation
from trainer.precision import resolve_precision

needs_deepspeed = pytest.mark.skipif(
    not DEEPSPEED.available(), reason="deepspeed is not installed (pip install 'trainer-kit[deepspeed]')")
LR = 1e-2  # as in the worker
ABORT_SIGNS = ("terminate called", "Aborted", "core dumped", "Segmentation fault", "Fatal Python error")
INSTALL = "pip install 'trainer-kit[deepspeed]'"


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


def assert_clean(result: subprocess.CompletedProcess | tuple, marker: str) -> None:
    """Exit code 0, no abort at interpreter exit, and no process of the run left behind."""
    stderr = result.stderr if isinstance(result, subprocess.CompletedProcess) else result[2]
    assert not any(sign in stderr for sign in ABORT_SIGNS), stderr[-3000:]
    deadline = time.monotonic() + 10
    while True:
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every two-process run, once: ZeRO 1-3 x accumulation 1/2, memory, export, save/load/continue."""
    out = tmp_path_factory.mktemp("deepspeed")
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DS_ACCELERATOR", "cpu")
        # a ZeRO-3 checkpoint of four processes first: the two-process runs resume it
        four = run_distributed(WORKERS_DIR / "deepspeed_worker.py", nproc=4, args=[str(out), "four"], timeout=400)
        assert all(f"OK rank {rank}" in four.stdout for rank in range(4)), four.stdout
        result = run_distributed(WORKERS_DIR / "deepspeed_worker.py", nproc=2, args=[str(out)], timeout=400)
    (out / "wall.json").write_text(json.dumps({"seconds": time.monotonic() - started}))
    assert "OK rank 0" in result.stdout and "OK rank 1" in result.stdout
    assert_clean(result, str(out))
    return out


_reference: dict[int, dict[str, torch.Tensor]] = {}


def one_process(accumulation: int) -> dict[str, torch.Tensor]:
    """The same 20 AdamW steps on one process with the global batch (2 x 8)."""
    if accumulation not in _reference:
        PartialState._reset_state()
        set_seed(0)
        accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(dataset(), batch_size=16, shuffle=True))
        train_steps(accelerator, model, optimizer, loader)
        _reference[accumulation] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _reference[accumulation]


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_zero_stages_on_two_processes_equal_one_process(runs, stage, accumulation):
    weights = load_file(str(runs / f"z{stage}_k{accumulation}" / "model.safetensors"))
    single = one_process(accumulation)
    diff = max_diff(weights, single)
    print(f"ZeRO-{stage} accumulation {accumulation}: max abs diff {diff:.3g}")
    assert diff <= 1e-5, diff
    initial = make_model().state_dict()
    assert max_diff(single, initial) > 1e-2  # the runs did train


@needs_deepspeed
def test_zero3_shards_parameters_and_optimizer_state(runs):
    for rank in (0, 1):
        sizes = json.loads((runs / f"memory_rank{rank}.json").read_text())
        local = sizes["local_params"] + sizes["local_optimizer"]
        ratio = local / (sizes["full_params"] + sizes["full_optimizer"])
        print(f"rank {rank}: {local} of {sizes['full_params'] + sizes['full_optimizer']} bytes ({ratio:.3f}); "
              f"vs plain AdamW's {sizes['plain_adamw']}: {local / sizes['plain_adamw']:.3f}")
        assert ratio <= 0.55, sizes
        assert sizes["local_params"] <= 0.55 * sizes["full_params"], sizes


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_save_with_two_load_with_two_and_continue_equals_an_uninterrupted_run(runs, stage):
    resumed = load_file(str(runs / f"resumed_z{stage}_safetensors" / "model.safetensors"))
    straight = load_file(str(runs / f"z{stage}_k1" / "model.safetensors"))
    diff = max_diff(resumed, straight)
    print(f"ZeRO-{stage} resumed vs uninterrupted: max abs diff {diff:.3g}")
    assert diff <= 1e-6, diff
    checkpoint = runs / f"checkpoint_z{stage}_safetensors"
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".safetensors"}, files
    assert (checkpoint / "zero" / "rank_0.safetensors").is_file() and (checkpoint / "zero" / "rank_1.safetensors").is_file()


@needs_deepspeed
def test_a_zero3_checkpoint_of_four_processes_resumes_on_two_and_merges_into_whole_weights(runs, tmp_path):
    """Saved by four processes at step 10, resumed by two (same global batches): the weights of the uninterrupted
    four-process run; `trainer merge-weights` joins the four processes' shards into the weights at the save."""
    straight = load_file(str(runs / "z3_four_straight" / "model.safetensors"))
    resumed = load_file(str(runs / "z3_from_four" / "model.safetensors"))
    diff = max_diff(resumed, straight)
    print(f"ZeRO-3 saved on 4, resumed on 2 vs uninterrupted on 4: max abs diff {diff:.3g}")
    assert diff <= 1e-5, diff
    assert max_diff(straight, load_file(str(runs / "z3_four_at_save" / "model.safetensors"))) > 1e-3  # steps 10-20 moved
    assert json.loads((runs / "checkpoint_z3_four" / "zero" / "meta.json").read_text())["num_processes"] == 4
    code, _, err = run_cli("merge-weights", str(runs / "checkpoint_z3_four"), str(tmp_path / "merged"))
    assert code == 0, err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    at_save = load_file(str(runs / "z3_four_at_save" / "model.safetensors"))
    assert merged.keys() == at_save.keys() == make_model().state_dict().keys()
    assert all(torch.equal(merged[name], at_save[name]) for name in at_save)


@needs_deepspeed
@pytest.mark.parametrize("new_count", [1, 2, 3, 5])
def test_a_zero3_reshard_reads_only_the_saved_ranges_of_its_own_part(tmp_path, new_count):
    """A parameter of 11 values saved by 4 processes (parts of 3, the last padded) at offset 5 of each one's flat
    group: each new process's part equals the whole's, and only the saved parts it overlaps are read."""
    whole = torch.arange(1.0, 12.0)
    saved_part = 3
    for rank in range(4):
        flat = torch.full((5 + saved_part + 2,), -1.0)  # other parameters' values around this one's
        mine = whole[rank * saved_part:(rank + 1) * saved_part]
        flat[5:5 + mine.numel()] = mine
        flat[5 + mine.numel():5 + saved_part] = 0.0  # the padding
        save_state_files({"flat": flat}, tmp_path, f"rank_{rank}")
    part = -(-whole.numel() // new_count)
    padded = torch.cat([whole, torch.zeros(part * new_count - whole.numel())])
    with ExitStack() as files:
        stored = [files.enter_context(open_state(tmp_path, f"rank_{rank}"))["flat"] for rank in range(4)]
        for process in range(new_count):
            read: list[tuple[int, int, int]] = []
            got = _my_part([ReadLog(part, rank, read) for rank, part in enumerate(stored)], 5, saved_part,
                           whole.numel(), part, process)
            assert torch.equal(got, padded[process * part:(process + 1) * part])
            first, last = process * part, min((process + 1) * part, whole.numel()) - 1
            expected = set(range(first // saved_part, last // saved_part + 1)) if first <= last else set()
            assert {rank for rank, _, _ in read} == expected
            assert all(5 <= start <= stop <= 5 + saved_part for _, start, stop in read)


class ReadLog:
    """A saved tensor whose reads are written down (rank, start, stop), then done on the file."""

    def __init__(self, stored, rank: int, log: list) -> None:
        self.stored, self.rank, self.log = stored, rank, log

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        self.log.append((self.rank, start, stop))
        return self.stored.read_range(start, stop)


def test_deepspeed_own_checkpoint_files_need_an_explicit_opt_in(runs):
    error = (runs / "untrusted_error.txt").read_text()
    assert "DeepSpeed(trust_deepspeed_checkpoints=True)" in error and "pickles" in error
    resumed = load_file(str(runs / "resumed_z2_deepspeed" / "model.safetensors"))
    straight = load_file(str(runs / "z2_k1" / "model.safetensors"))
    assert max_diff(resumed, straight) <= 1e-6


@needs_deepspeed
@pytest.mark.parametrize("export", ["z3_k1", "z3_k1_16bit"])
def test_the_consolidated_export_loads_into_the_plain_model(runs, export):
    model = make_model()
    missing, unexpected = load_model(model, str(runs / export / "model.safetensors"))
    assert not missing and not unexpected
    expected = load_file(str(runs / "z3_k1_outputs.safetensors"))["outputs"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers ran (OMP_NUM_THREADS=1): the same summation order
    try:
        with torch.no_grad():
            outputs = model(torch.linspace(-2, 2, 5 * 6).view(5, 6))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs, expected), (outputs - expected).abs().max()


ATTEMPTS = (
    "from trainer import Accelerator; Accelerator(strategy='deepspeed')",
    "from strategies import DeepSpeed; DeepSpeed(zero_stage=2)",
    "from trainer import Trainer; import torch; Trainer(torch.nn.Linear(2, 2), strategy='deepspeed')",
)


def test_a_missing_deepspeed_is_one_clear_error_before_any_work(tmp_path, monkeypatch):
    errors = import_errors_without("deepspeed", ATTEMPTS, tmp_path)
    assert len(errors) == 3, errors
    for line in errors:
        assert line.startswith("ERROR ImportError ") and INSTALL in line and line.endswith("process group: False"), line
    # trainer launch: refused before any process starts.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    code, out, err = run_cli("launch", "--use_deepspeed", "--num_processes", "2", "--cpu",
                             str(WORKERS_DIR / "launch_probe.py"), timeout=120)
    assert code == 2 and INSTALL in err and "Traceback" not in err, err
    assert "PROBE" not in out


@needs_deepspeed
def test_auto_values_come_from_the_run(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    strategy = DeepSpeed(config=config)
    strategy.setup_environment(torch.device("cpu"), 0, 2)
    strategy.setup_policies(resolve_precision("bf16", torch.device("cpu")), GradientAccumulation(2))
    strategy.observe_batch_size(8)
    strategy.clip_grad_norm_([], 0.5)
    resolved = strategy.resolved_config()
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"],
            resolved["train_batch_size"]) == (8, 2, 32)
    assert resolved["bf16"] == {"enabled": True} and resolved["fp16"] == {"enabled": False}
    assert resolved["gradient_clipping"] == 0.5 and resolved["managed_gradient_accumulation"] is False
    assert resolved["zero_optimization"] == {"stage": 3}  # DeepSpeed's own default bucket size
    with pytest.raises(ValueError, match=r"says train_micro_batch_size_per_gpu=4, but the prepared data loader gives "
                                         r"each process batches of 8"):
        clash = DeepSpeed(config={"train_micro_batch_size_per_gpu": 4})
        clash.setup_environment(torch.device("cpu"), 0, 2)
        clash.setup_policies(resolve_precision("no", torch.device("cpu")), GradientAccumulation(1))
        clash.observe_batch_size(8)
        clash.resolved_config()


@needs_deepspeed
def test_a_real_mismatch_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(ValueError, match=r"The DeepSpeed config says gradient_accumulation_steps=4, but the Accelerator "
                                         r"accumulates 2 micro-batches per step"):
        Accelerator(strategy=DeepSpeed(config={"gradient_accumulation_steps": 4}), gradient_accumulation_steps=2, cpu=True)
    with pytest.raises(ValueError, match=r"DeepSpeed\(zero_stage=2\) disagrees with the DeepSpeed config's "
                                         r"zero_optimization.stage=3"):
        DeepSpeed(config={"zero_optimization": {"stage": 3}}, zero_stage=2)
    strategy = DeepSpeed(config={"gradient_clipping": 1.0})
    with pytest.raises(ValueError, match=r"The DeepSpeed config clips gradients to 1.0, and clip_grad_norm_ asks for 0.5"):
        strategy.clip_grad_norm_([], 0.5)


@pytest.fixture
def no_launcher(monkeypatch):
    """A process started with plain ``python``: none of the variables a launcher sets; DeepSpeed on the CPU."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that what the run sets is removed again afterwards
        monkeypatch.delenv(name)


@needs_deepspeed
def test_zero3_init_flag_on_one_process_without_a_launcher(no_launcher):
    strategy = DeepSpeed(zero_stage=3, zero3_init_flag=True)
    accelerator = Accelerator(strategy=strategy, cpu=True)
    try:
        with strategy.module_sharded_context():
            model = make_model()
        assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())  # built partitioned
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        model, optimizer = accelerator.prepare(model, optimizer)
        x, y = dataset().tensors
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x[:16]), y[:16])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses  # the steps trained the partitioned model
    finally:
        accelerator.end_training()


@needs_deepspeed
def test_launch_config_section_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": "auto"}, "gradient_clipping": "auto"}))
    strategy = DeepSpeed.from_config({"zero_stage": 3, "gradient_clipping": 1.0, "deepspeed_config_file": str(path),
                                      "zero3_save_16bit_model": True, "deepspeed_multinode_launcher": "standard"})
    assert strategy.zero_stage == 3 and strategy.zero3_save_16bit_model and strategy.config["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match=r"Unknown deepspeed_config key 'zero_stag'. Did you mean 'zero_stage'\?"):
        DeepSpeed.from_config({"zero_stag": 2})
    assert isinstance(resolve_strategy("deepspeed", 2, {"deepspeed": {"zero_stage": 1}}), DeepSpeed)
    assert resolve_strategy("DEEPSPEED", 2, {"deepspeed": {"zero_stage": 1}}).zero_stage == 1


@needs_deepspeed
def test_a_deepspeed_launch_config_runs_the_trainer_example(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "mixed_precision": "no",
              "num_machines": 1, "num_processes": 2, "use_cpu": True,
              "deepspeed_config": {"zero_stage": 2, "offload_optimizer_device": "none", "zero3_init_flag": False}}
    path = tmp_path / "deepspeed_config.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    result = run_cli("launch", "--config_file", str(path), "examples/trainer_digits.py",
                     "--output-dir", str(tmp_path / "digits"), "--epochs", "4", timeout=300)
    code, out, err = result
    print(f"trainer_digits under DeepSpeed ZeRO-2: {time.monotonic() - started:.1f} s")
    assert code == 0, err[-5000:]
    assert_clean(result, str(tmp_path))
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.85, out
    latest = tmp_path / "digits" / "checkpoints" / "latest"
    assert latest.is_file()
    assert any((tmp_path / "digits" / "checkpoints").rglob("zero/rank_1.safetensors"))
