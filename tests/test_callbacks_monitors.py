"""ThroughputMonitor, DeviceStatsMonitor, ModelSummary and Profiler on small CPU runs."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_distributed
from torch.utils.data import TensorDataset, default_collate

from trainer import Trainer
from trainer.callbacks import Callback
from trainer.callbacks.device_stats import DeviceStatsMonitor, accelerator_memory
from trainer.callbacks.model_summary import ModelSummary, summarize
from trainer.callbacks.profiler import Profiler
from trainer.callbacks.throughput import ThroughputMonitor, batch_counts, device_peak_flops

STEP_SECONDS = 0.01  # each training step sleeps this long, so the rates are steady on a busy machine


class SleepyRegressor(Trainer):
    def training_step(self, batch):
        time.sleep(STEP_SECONDS)
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def validation_step(self, batch):
        time.sleep(0.05)  # validation time must be kept off the training clock
        x, y = batch
        return {"val_loss": F.mse_loss(self.model(x), y)}


class Stopwatch(Callback):
    """The test's own count: the clock and the samples at each optimizer step, and the time spent validating."""

    def __init__(self):
        self.marks = {}  # global_step -> (clock less validation time, samples so far)
        self.samples = 0
        self.paused = 0.0
        self.validation_began = None

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.samples += len(batch[0])
        if trainer.accelerator.sync_gradients:
            self.marks[trainer.global_step] = (time.perf_counter() - self.paused, self.samples)

    def on_validation_start(self, trainer):
        self.validation_began = time.perf_counter()

    def on_validation_end(self, trainer, metrics):
        self.paused += time.perf_counter() - self.validation_began


def logged(trainer, name):
    _, by_step = trainer.logged_since(0)
    return {step: values[name] for step, values in by_step.items() if name in values}


def regression_data(samples=60, features=4):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=generator)
    return TensorDataset(x, x.sum(1, keepdim=True))


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory):
    """One run timed by the monitor and by the test: 2 epochs of 14 steps (4 samples each), validating every 7."""
    monitor, stopwatch = ThroughputMonitor(window=5, measure_flops=True), Stopwatch()
    trainer = SleepyRegressor(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
                              train_data=regression_data(56), eval_data=regression_data(8), batch_size=4,
                              max_epochs=2, eval_every_n_steps=7, output_dir=tmp_path_factory.mktemp("timed"),
                              callbacks=[monitor, stopwatch], progress_bar=False, checkpoint=False, trackers=[])
    trainer.fit()
    return trainer, monitor, stopwatch


def test_samples_per_second_match_the_tests_own_count(timed_run):
    trainer, monitor, stopwatch = timed_run
    rates = logged(trainer, "throughput/samples_per_sec")
    assert sorted(rates) == [5, 10, 15, 20, 25]  # every window steps; the first step only starts the clock
    errors = {}
    for step, rate in rates.items():
        start = max(step - monitor.window, 1)  # the first window starts after step 1
        (t0, n0), (t1, n1) = stopwatch.marks[start], stopwatch.marks[step]
        expected = (n1 - n0) / (t1 - t0)
        errors[step] = abs(rate - expected) / expected
    assert max(errors.values()) < 0.10, errors
    # Validation (0.05 s a batch, twice in these windows) is off the clock: counted, it would halve the rate.
    assert min(rates.values()) > 0.5 * 4 / STEP_SECONDS


def test_flops_are_measured_on_the_first_batch_and_give_flops_per_second(timed_run):
    trainer, monitor, _ = timed_run
    # Forward 2*(4*8 + 8*1) per sample; backward the same for weight gradients, plus 2*8*1 for the
    # input gradient of the second layer (the first layer's input needs none).
    assert monitor.flops_per_sample == 2 * 40 + 2 * 40 + 2 * 8
    rates, flops = logged(trainer, "throughput/samples_per_sec"), logged(trainer, "throughput/flops_per_sec")
    assert all(flops[step] == pytest.approx(176 * rates[step]) for step in rates)
    assert not logged(trainer, "throughput/mfu")  # a CPU without peak_flops: no MFU
    assert not logged(trainer, "throughput/tokens_per_sec")  # not token batches


class TokenTrainer(Trainer):
    def training_step(self, batch):
        hidden = self.model(batch["input_ids"].float())
        return (hidden * batch["attention_mask"]).mean()


def test_tokens_count_the_attention_mask_and_mfu_uses_the_peak_given(tmp_path):
    lengths = [3, 5, 8, 2, 7, 6, 4, 8] * 3
    rows = [{"input_ids": torch.arange(8), "attention_mask": (torch.arange(8) < n).long()} for n in lengths]
    monitor = ThroughputMonitor(flops_per_sample=1000.0, peak_flops=1e9, window=2)
    trainer = TokenTrainer(torch.nn.Linear(8, 8), train_data=rows, batch_size=4, collate_fn=default_collate,
                           shuffle=False, max_epochs=1, output_dir=tmp_path, callbacks=[monitor], progress_bar=False,
                           checkpoint=False, trackers=[])
    trainer.fit()
    samples, tokens = logged(trainer, "throughput/samples_per_sec"), logged(trainer, "throughput/tokens_per_sec")
    mfu = logged(trainer, "throughput/mfu")
    assert sorted(tokens) == [2, 4, 6]
    for step in tokens:  # the same window: tokens per sample is the masks' count over its batches
        window_lengths = lengths[4 * max(step - 2, 1): 4 * step]
        assert tokens[step] / samples[step] == pytest.approx(sum(window_lengths) / len(window_lengths), rel=1e-12)
        assert mfu[step] == pytest.approx(1000.0 * samples[step] / 1e9, rel=1e-12)


def test_peak_flops_table_by_device_name_and_precision(monkeypatch):
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H100 PCIe", 2: "NVIDIA L40S", 3: "NVIDIA L4"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[device.index])
    assert device_peak_flops(torch.device("cuda", 0), "bf16") == 989.4e12
    assert device_peak_flops(torch.device("cuda", 1), "fp16") == 756.0e12
    assert device_peak_flops(torch.device("cuda", 2), "bf16") is None  # unknown: "l4" is a whole word only
    assert device_peak_flops(torch.device("cuda", 3), "no") == 30.3e12  # float32 matmuls at "highest"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert device_peak_flops(torch.device("cuda", 3), "no") == 60.0e12  # TF32
    assert device_peak_flops(torch.device("cpu"), "bf16") is None


def test_batch_counts():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    samples, tokens = batch_counts({"input_ids": torch.zeros(2, 3), "attention_mask": mask})
    assert (samples, int(tokens)) == (2, 3)
    assert batch_counts({"input_ids": torch.zeros(2, 3)}) == (2, 6)
    assert batch_counts((torch.zeros(5, 2), torch.zeros(5))) == (5, None)
    assert batch_counts(torch.zeros(7, 1)) == (7, None)


def test_device_stats_are_logged_every_n_steps(tmp_path):
    trainer = SleepyRegressor(torch.nn.Linear(4, 1), train_data=regression_data(24), batch_size=4, max_epochs=1,
                              output_dir=tmp_path, callbacks=[DeviceStatsMonitor(log_every_n_steps=2)],
                              progress_bar=False, checkpoint=False, trackers=[])
    trainer.fit()
    rss = logged(trainer, "device_stats/cpu_rss_mib")
    assert sorted(rss) == [2, 4, 6] and all(value > 10 for value in rss.values())
    assert sorted(logged(trainer, "device_stats/cpu_percent")) == [2, 4, 6]


def test_accelerator_memory_reads_torch_accelerator(monkeypatch):
    assert accelerator_memory(torch.device("cpu")) == {}
    for name, value in (("memory_allocated", 2**20), ("max_memory_allocated", 3 * 2**20), ("memory_reserved", 2**22)):
        monkeypatch.setattr(torch.accelerator, name, lambda device, value=value: value, raising=False)
    assert accelerator_memory(torch.device("cuda", 0)) == {
        "cuda_allocated_mib": 1.0, "cuda_max_allocated_mib": 3.0, "cuda_reserved_mib": 4.0}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10))
        self.head = torch.nn.Linear(10, 2)
        self.tied = self.head  # shared: counted once
        self.scale = torch.nn.Parameter(torch.ones(3))  # the model's own: in the totals only
        for p in self.encoder[0].parameters():
            p.requires_grad_(False)


def test_model_summary_counts_modules_and_totals():
    text = summarize(Net(), max_depth=1)
    lines = text.splitlines()
    assert lines[0].split("|")[1:] == [" Name    ", " Type       ", " Params ", " Trainable"]
    assert lines[2].split() == ["0", "|", "encoder", "|", "Sequential", "|", "160", "|", "110"]
    assert lines[3].split() == ["1", "|", "head", "|", "Linear", "|", "22", "|", "22"]
    assert lines[-4:] == ["135    Trainable params", "50     Frozen params", "185    Total params",
                          "0.001  Total size of the parameters (MB)"]
    deep = summarize(Net(), max_depth=-1)
    assert "encoder.0 | Linear" in deep and "encoder.1 | ReLU" in deep
    assert summarize(Net(), max_depth=0).splitlines()[1:] == lines[-4:]


def test_model_summary_prints_when_fit_begins_and_is_cheap(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 1))
    model[0].requires_grad_(False)
    trainer = SleepyRegressor(model, train_data=regression_data(8), batch_size=8, max_steps=1, output_dir=tmp_path,
                              callbacks=[ModelSummary()], progress_bar=False, checkpoint=False, trackers=[])
    trainer.fit()
    printed = capsys.readouterr().out
    assert "11     Trainable params" in printed and "40     Frozen params" not in printed and "50     Frozen" in printed
    walks = []

    class Counted(torch.nn.Sequential):  # records each walk over the whole model
        def named_parameters(self, *args, **kwargs):
            walks.append("parameters")
            return super().named_parameters(*args, **kwargs)

        def named_modules(self, *args, **kwargs):
            walks.append("modules")
            return super().named_modules(*args, **kwargs)

    big = Counted(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)) for _ in range(2000)])
    text = summarize(big, max_depth=2)
    # Cheap for thousands of modules: one pass over the parameters (torch walks the modules for it)
    # and one over the modules for the rows, whatever the size.
    assert walks == ["parameters", "modules", "modules"]
    assert "176.0 K  Total params" in text  # 2000 * (72 + 16) parameters


def test_profiler_writes_a_chrome_trace_of_the_active_steps(tmp_path):
    profiler = Profiler(schedule=dict(wait=1, warmup=1, active=2, repeat=1))
    trainer = SleepyRegressor(torch.nn.Linear(4, 1), train_data=regression_data(24), batch_size=4, max_epochs=1,
                              output_dir=tmp_path, callbacks=[profiler], progress_bar=False, checkpoint=False, trackers=[])
    trainer.fit()
    assert len(profiler.trace_files) == 1 and profiler.trace_files[0].parent == tmp_path / "profiler"
    trace = json.loads(profiler.trace_files[0].read_text())
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("name") == "aten::addmm" for e in trace["traceEvents"])


@pytest.mark.parametrize(("build", "message"), [
    (lambda: ThroughputMonitor(window=0), "window=0"),
    (lambda: ThroughputMonitor(flops_per_sample=-1), "flops_per_sample=-1"),
    (lambda: ThroughputMonitor(flops_per_sample=10, measure_flops=True), "not both"),
    (lambda: ThroughputMonitor(log_every_n_steps=1.5), "log_every_n_steps=1.5"),
    (lambda: DeviceStatsMonitor(log_every_n_steps=0), "log_every_n_steps=0"),
    (lambda: ModelSummary(max_depth=-2), "max_depth=-2"),
    (lambda: Profiler(schedule=dict(wait=1)), "'active' required"),
    (lambda: Profiler(schedule=dict(active=0)), "active must be"),
    (lambda: Profiler(activities=["gpu"]), "activities=['gpu']"),
    (lambda: Profiler(record_shapes="yes"), "record_shapes='yes'"),
])
def test_bad_arguments_are_one_clear_error(build, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build()


DDP_SCRIPT = """
import json, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
from torch.utils.data import TensorDataset
from trainer import Trainer
from trainer.callbacks import Callback
from trainer.callbacks.ema import EMA
from trainer.callbacks.model_summary import ModelSummary
from trainer.callbacks.throughput import ThroughputMonitor


class Regressor(Trainer):
    def training_step(self, batch):
        time.sleep(0.01)
        x, y = batch
        return F.mse_loss(self.model(x), y)


class Stopwatch(Callback):
    def __init__(self):
        self.marks = {}

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.marks[trainer.global_step] = time.perf_counter()


torch.manual_seed(0)
x = torch.randn(96, 4)
ema, stopwatch = EMA(decay=0.5), Stopwatch()
trainer = Regressor(torch.nn.Linear(4, 1), train_data=TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4,
                    max_epochs=1, output_dir=sys.argv[1], progress_bar=False, checkpoint=False, trackers=[],
                    callbacks=[stopwatch, ThroughputMonitor(window=4), ModelSummary(), ema])  # clocks read before the reduce
trainer.fit()
_, by_step = trainer.logged_since(0)
rates = {s: v["throughput/samples_per_sec"] for s, v in by_step.items() if "throughput/samples_per_sec" in v}
# What this process saw: 4 samples a step on each of the 2 processes, over its own clock.
own = {s: 2 * 4 * (s - max(s - 4, 1)) / (stopwatch.marks[s] - stopwatch.marks[max(s - 4, 1)]) for s in rates}
# Each process its own file: two processes' writes to one pipe may interleave once they exceed PIPE_BUF.
rank = trainer.accelerator.process_index
(Path(sys.argv[1]) / f"result_{rank}.json").write_text(json.dumps({
    "rank": rank, "rates": rates, "own": own, "ema": ema.averaged_state_dict()["weight"].tolist()}))
"""


def test_two_processes_sum_their_samples_print_one_summary_and_keep_one_ema(tmp_path):
    """Under DDP (2 CPU processes): one all-reduce sums the samples, the summary prints once, EMA agrees."""
    script = tmp_path / "ddp_monitors.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    result = run_distributed(script, nproc=2, args=[str(tmp_path / "out")])
    reports = [json.loads((tmp_path / "out" / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["rank"] for report in reports] == [0, 1]
    assert result.stdout.count("Trainable params") == 1
    assert reports[0]["rates"] == reports[1]["rates"] and sorted(reports[0]["rates"]) == ["12", "4", "8"]
    for step, rate in reports[0]["rates"].items():
        assert abs(rate / reports[0]["own"][step] - 1) < 0.10, (step, rate, reports[0]["own"][step])
    assert reports[0]["ema"] == reports[1]["ema"]
