"""Per-step overhead of the Accelerator and the Trainer over a plain PyTorch loop, in one run.

A small MLP on the CPU (about 1 ms per step) is trained by a plain loop, by the same loop with
the lines the Accelerator adds, and by the Trainer with its default callbacks (progress bar on,
drawn to /dev/null, the model summary, the CSV and MLflow trackers, a checkpoint each epoch,
outside the timed steps), in one ``fit`` as a training run is. Epochs of each alternate (the
other loops run before each of the Trainer's epochs, in a new order each round) so that drift of
the machine's speed affects all alike; the printed figures are ratios of median step times
(targets: Accelerator <= 1.01, Trainer <= 1.03). The prepared optimizer clears gradients without
torch's per-call profiler annotation (which ``Optimizer.zero_grad`` adds even when nothing records;
kept while a profiler runs), so the Accelerator's loop may come out slightly under 1. The process is pinned to one CPU
(the last it may use, or ``--cpu``) so that moves between cores, which leave caches cold, do not
add noise; background threads (MLflow's logging queue) share that CPU, so their work is counted.

Then whole short runs, each in a new output folder: the time from ``Trainer(...)`` to the first
optimizer step and the time of a 100-step ``fit``, with the default trackers (CSV and a local
MLflow store) against none and against the raw loop (targets: first step <= 0.2 s later than with
no trackers; the fit <= 1.1 x the raw loop), and a check that MLflow holds every logged value.

    python benchmarks/overhead.py [--rounds 30] [--steps 100] [--threads 1] [--cpu N | --cpu none]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from callbacks import Callback, ProgressBar  # noqa: E402
from trainer import Accelerator, PartialState, Trainer  # noqa: E402


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


class MLPTrainer(Trainer):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)


class Rounds(Callback):
    """Runs the comparison from inside one ``fit``, as a training run is: before each of the
    Trainer's epochs, one epoch of every other loop, in a new order each round.

    The Trainer's steps are timed between batch ends (data loading included), as the loops time
    theirs. Its per-run work (trackers starting, the model summary) happens once, in the warm-up.
    """

    def __init__(self, loops: dict[str, Callable[[list[float]], None]], rounds: int, warmup: int) -> None:
        self.loops, self.rounds, self.warmup = loops, rounds, warmup
        self.times: dict[str, list[float]] = {name: [] for name in [*loops, "trainer"]}
        self.paired: dict[str, list[float]] = {name: [] for name in self.times}
        self._shuffler = random.Random(0)
        self._round: dict[str, list[float]] = {}
        self._last = 0.0

    def on_train_epoch_start(self, trainer) -> None:
        if trainer.current_epoch == self.warmup:
            gc.collect()
            gc.freeze()  # the objects built so far are never scanned again: collections stay cheap and even
        self._round = {name: [] for name in self.times}
        for name in self._shuffler.sample(list(self.loops), len(self.loops)):
            self.loops[name](self._round[name])
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._round["trainer"].append(now - self._last)
        self._last = now

    def on_train_epoch_end(self, trainer) -> None:
        if trainer.current_epoch < self.warmup:
            return
        base = statistics.median(self._round["plain"])
        for name, times in self._round.items():
            self.times[name] += times
            self.paired[name].append(statistics.median(times) / base)


class FirstStep(Callback):
    def __init__(self) -> None:
        self.at: float | None = None

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def short_runs(rounds: int, width: int, batch: int, steps: int = 100) -> None:
    """Whole 100-step runs in new output folders: raw loop, Trainer without trackers, with the default ones."""
    dataset = loader(steps, batch).dataset
    results: dict[str, list[tuple[float, float, float]]] = {"raw": [], "none": [], "default": []}
    last_dir = ""
    for round_ in range(rounds + 1):  # the first round warms up (imports, mlflow's empty store)
        for kind in random.Random(round_).sample(list(results), len(results)):
            PartialState._reset_state()
            model, optimizer = make(round_, width)
            start, cpu_start = time.perf_counter(), time.process_time()
            if kind == "raw":
                data = DataLoader(dataset, batch_size=batch)
                first = None
                for x, y in data:
                    optimizer.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    optimizer.step()
                    first = first or time.perf_counter()
                timing = (first - start, time.perf_counter() - start, time.process_time() - cpu_start)
            else:
                probe, folder = FirstStep(), tempfile.mkdtemp(prefix="overhead-run-")
                last_dir = folder if kind == "default" else last_dir
                trainer = MLPTrainer(model, optimizer, train_data=dataset, batch_size=batch, shuffle=False,
                                     max_steps=steps, cpu=True, output_dir=folder, callbacks=[probe],
                                     trackers=[] if kind == "none" else None, log_every_n_steps=1)
                with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
                    trainer.fit()
                timing = (probe.at - start, time.perf_counter() - start, time.process_time() - cpu_start)
            if round_:
                results[kind].append(timing)
    first = {kind: statistics.median(t[0] for t in runs) for kind, runs in results.items()}
    whole = {kind: statistics.median(t[1] for t in runs) for kind, runs in results.items()}
    cpu = {kind: statistics.median(t[2] for t in runs) for kind, runs in results.items()}
    print(f"\n{steps}-step runs in new output folders, median of {rounds}:")
    print(f"{'':<36}{'first step':>13}{'whole run':>13}{'run / raw':>12}{'CPU, all threads':>19}")
    for kind, label in (("raw", "raw loop"), ("none", "Trainer, trackers=[]"), ("default", "Trainer, default trackers")):
        print(f"{label:<36}{first[kind]:>11.3f} s{whole[kind]:>11.3f} s{whole[kind] / whole['raw']:>12.3f}"
              f"{cpu[kind]:>17.3f} s")
    print(f"the default trackers' own work (creating the store, starting, writing and ending the run, on their "
          f"thread): {1e3 * (cpu['default'] - cpu['none']):.0f} ms of CPU per run")
    print(f"default trackers: first step {first['default'] - first['none']:+.3f} s against none (target <= 0.2 s); "
          f"run / raw {whole['default'] / whole['raw']:.3f} (target <= 1.1)")
    try:
        from mlflow import MlflowClient
    except ImportError:
        return
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(last_dir) / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("trainer").experiment_id])[0]
    logged = len(client.get_metric_history(run.info.run_id, "train_loss"))
    print(f"MLflow holds {logged} of {steps} logged train_loss values, run {run.info.status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60, help="alternating epochs of each loop")
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu", default=None, help="the CPU to run on (default: the last one allowed); 'none': any")
    parser.add_argument("--short-runs", type=int, default=7, help="rounds of whole 100-step runs (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu != "none" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(args.cpu) if args.cpu is not None else max(os.sched_getaffinity(0))})

    # Every loop trains the same parameters with the same optimizer state and reads the same
    # tensors: step times then differ only by what each loop adds, not by where memory happens to lie.
    model, plain_opt = make(0, args.width)
    dataset = loader(args.steps, args.batch).dataset
    plain_data = DataLoader(dataset, batch_size=args.batch)

    accelerator = Accelerator(cpu=True)
    _, optimizer, data = accelerator.prepare(model, plain_opt, DataLoader(dataset, batch_size=args.batch))

    PartialState._reset_state()
    accumulating = Accelerator(cpu=True, gradient_accumulation_steps=1)
    _, acc_opt, acc_data = accumulating.prepare(model, plain_opt, DataLoader(dataset, batch_size=args.batch))

    PartialState._reset_state()
    plain_model = acc_model = model
    loops = {
        "plain": lambda out: plain_epoch(plain_model, plain_opt, plain_data, out),
        "accelerator": lambda out: accelerated_epoch(accelerator, model, optimizer, data, out),
        "accumulate": lambda out: accumulate_epoch(accumulating, acc_model, acc_opt, acc_data, out),
    }
    warmup = 3
    rounds = Rounds(loops, args.rounds, warmup)
    trainer = MLPTrainer(model, plain_opt, train_data=dataset, batch_size=args.batch, shuffle=False,
                         max_epochs=warmup + args.rounds, cpu=True, output_dir=tempfile.mkdtemp(prefix="overhead-"),
                         callbacks=[ProgressBar(enabled=True), rounds])
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        trainer.fit()
    times, paired = rounds.times, rounds.paired

    base = statistics.median(times["plain"])
    pinned = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "any"
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPUs {pinned}, MLP width {args.width}, "
          f"batch {args.batch}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'loop':<36}{'median step':>13}{'ratio of medians':>18}{'median of round ratios':>24}")
    labels = {"plain": "plain PyTorch", "accelerator": "Accelerator (prepare + backward)",
              "accumulate": "Accelerator + accumulate(k=1)", "trainer": "Trainer (default callbacks, bar on)"}
    for name, label in labels.items():
        median = statistics.median(times[name])
        print(f"{label:<36}{median * 1e3:>10.3f} ms{median / base:>18.4f}{statistics.median(paired[name]):>24.4f}")
    print(f"Accelerator / plain: {statistics.median(paired['accelerator']):.4f} (target <= 1.01); "
          f"Trainer / plain: {statistics.median(paired['trainer']):.4f} (target <= 1.03)")
    gc.unfreeze()
    if args.short_runs:
        short_runs(args.short_runs, args.width, args.batch)


if __name__ == "__main__":
    main()
