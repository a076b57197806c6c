"""ThroughputMonitor: samples/s, tokens/s and model FLOPs utilisation of training, over all processes.

The clock is read on the host at each optimizer step; the device is only waited for at the
steps where the rates are logged, so the monitor adds no synchronisation to the other steps.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from .base import Callback

if TYPE_CHECKING:
    from .protocols import TrainerView

# Dense peak FLOP/s per device (no sparsity), from the vendors' data sheets: 16-bit tensor-core
# math, TF32 (float32 matmuls with torch.set_float32_matmul_precision("high")) and plain float32.
# Keys are matched as whole words in torch.cuda.get_device_name() (so "l4" is not an L40S), first match wins.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h200": {"16-bit": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100 pcie": {"16-bit": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "h100": {"16-bit": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "a100": {"16-bit": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
    "l4": {"16-bit": 121.0e12, "tf32": 60.0e12, "fp32": 30.3e12},
    "v100": {"16-bit": 125.0e12, "fp32": 15.7e12},
    "t4": {"16-bit": 65.0e12, "fp32": 8.1e12},
}

PREFIX = "throughput/"


class _Collectives(Protocol):
    """What the monitor uses of the trainer's Accelerator beyond ``AcceleratorView``."""

    @property
    def num_processes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def reduce(self, tensor: Any, reduction: str = "sum", scale: float = 1.0) -> Any: ...


def device_peak_flops(device: torch.device, precision: str | None) -> float | None:
    """The table's peak FLOP/s of ``device`` for a run in ``precision`` (``"bf16"``, ``"no"``...), or None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    entry = next((peaks for key, peaks in PEAK_FLOPS.items() if re.search(rf"\b{re.escape(key)}\b", name)), None)
    if entry is None:
        return None
    if precision in ("bf16", "fp16", "fp8"):
        return entry["16-bit"]
    tf32 = torch.get_float32_matmul_precision() != "highest" and "tf32" in entry
    return entry["tf32"] if tf32 else entry["fp32"]


def batch_counts(batch: Any) -> tuple[int, Any]:
    """(samples, tokens) of a batch: tokens for a dict with ``input_ids`` (non-padding ones when it has an
    ``attention_mask``: a device tensor, summed without waiting for the device), else None."""
    if isinstance(batch, Mapping):
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        if torch.is_tensor(mask):
            return int(mask.shape[0]), mask.sum()
        if torch.is_tensor(ids):
            return int(ids.shape[0]), ids.numel()
        first = next((v for v in batch.values() if torch.is_tensor(v) and v.dim()), None)
        return (int(first.shape[0]) if first is not None else 1), None
    if isinstance(batch, (list, tuple)):
        first = next((v for v in batch if torch.is_tensor(v) and v.dim()), None)
        return (int(first.shape[0]) if first is not None else 1), None
    if torch.is_tensor(batch) and batch.dim():
        return int(batch.shape[0]), None
    return 1, None


def _check_count(name: str, value: Any, least: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"ThroughputMonitor({name}={value!r}): use a whole number >= {least}"
                         f"{', or None' if optional else ''}.")


def _check_positive(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"ThroughputMonitor({name}={value!r}): use a positive number, or None.")


class ThroughputMonitor(Callback):
    """Log the training throughput of all processes together: samples/s, tokens/s, FLOP/s and MFU.

    Logged every ``log_every_n_steps`` optimizer steps, averaged over the last ``window`` steps:

    - ``throughput/samples_per_sec``: samples of every process per second;
    - ``throughput/tokens_per_sec``: for token batches (dicts with ``input_ids``): tokens per
      second, counting only the non-padding ones when the batch has an ``attention_mask``;
    - ``throughput/flops_per_sec`` and ``throughput/mfu`` (model FLOPs utilisation: achieved over
      peak FLOP/s of all devices) when the FLOPs per sample are known.

    Args:
        flops_per_sample: FLOPs of one training sample, forward and backward (about 6 x
            parameters x tokens for a transformer).
        measure_flops: count them on the first training batch with
            ``torch.utils.flop_counter.FlopCounterMode`` (forward and backward of that batch,
            divided by its samples).
        peak_flops: peak FLOP/s of one device, for the MFU. Default: looked up for known GPUs
            (``PEAK_FLOPS``) by the run's precision; on a CPU or an unknown device no MFU is
            logged unless it is given.
        window: optimizer steps the rates are averaged over.
        log_every_n_steps: how often to log (default: every ``window`` steps, so each rate covers
            the steps since the previous log, between two points where the device was waited for).

    Time spent validating is left out, and so is the first step of each ``fit`` (warm-up, and
    the FLOP count when measured). The device is synchronised only at the logging steps, with
    one all-reduce when there are several processes.
    """

    def __init__(self, flops_per_sample: float | None = None, measure_flops: bool = False,
                 peak_flops: float | None = None, window: int = 10, log_every_n_steps: int | None = None) -> None:
        _check_positive("flops_per_sample", flops_per_sample)
        _check_positive("peak_flops", peak_flops)
        _check_count("window", window, 1)
        _check_count("log_every_n_steps", log_every_n_steps, 1, optional=True)
        if not isinstance(measure_flops, bool):
            raise ValueError(f"ThroughputMonitor(measure_flops={measure_flops!r}): use True or False.")
        if measure_flops and flops_per_sample is not None:
            raise ValueError("ThroughputMonitor: give flops_per_sample or measure_flops=True, not both.")
        self.flops_per_sample = flops_per_sample
        self.measure_flops = measure_flops
        self.peak_flops = peak_flops
        self.window = window
        self.log_every_n_steps = log_every_n_steps or window
        # One entry per optimizer step: (training clock, samples so far, tokens so far).
        self._marks: deque[tuple[float, int, Any]] = deque(maxlen=window + 1)
        self._samples = 0
        self._tokens: Any = None  # int, or a device tensor summed without synchronising
        self._paused_at: float | None = None
        self._paused = 0.0  # seconds spent validating, kept off the training clock
        self._counter: Any = None  # the FlopCounterMode open around the first batch
        self._peak: float | None = None

    def handles(self, event: str) -> bool:
        """``on_train_batch_start`` only to measure FLOPs; ``on_exception`` only to close their counter."""
        if event in ("on_train_batch_start", "on_exception"):
            return self.measure_flops
        return True

    def _clock(self) -> float:
        return time.perf_counter() - self._paused

    def on_fit_start(self, trainer: TrainerView) -> None:
        """``fit`` begins: start afresh (the first step, with its warm-up, only starts the clock) and find the peak."""
        self._marks.clear()
        self._samples, self._tokens, self._paused, self._paused_at = 0, None, 0.0, None
        accelerator = cast(_Collectives, trainer.accelerator)
        precision = trainer.run_config().get("precision")
        self._peak = self.peak_flops or device_peak_flops(accelerator.device, precision)

    def on_train_batch_start(self, trainer: TrainerView, batch: Any, batch_idx: int) -> None:
        """Before the first training batch, when FLOPs are to be measured: start counting them."""
        if self.measure_flops and self.flops_per_sample is None and self._counter is None:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After each micro-batch: count its samples (and tokens); at each optimizer step note the clock,
        and at logging steps wait for the device and log the rates."""
        samples, tokens = batch_counts(batch)
        if self._counter is not None:
            self._finish_flop_count(samples)
        self._samples += samples
        if tokens is not None:
            self._tokens = tokens if self._tokens is None else self._tokens + tokens
        if not trainer.accelerator.sync_gradients:
            return
        if self._marks and trainer.global_step % self.log_every_n_steps == 0:
            self._log(trainer)
        else:
            self._marks.append((self._clock(), self._samples, self._tokens))

    def _finish_flop_count(self, samples: int) -> None:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        self.flops_per_sample = counter.get_total_flops() / samples

    def _log(self, trainer: TrainerView) -> None:
        accelerator = cast(_Collectives, trainer.accelerator)
        if accelerator.device.type != "cpu" and torch.accelerator.is_available():
            torch.accelerator.synchronize(accelerator.device)  # the one wait: the steps timed are done
        self._marks.append((self._clock(), self._samples, self._tokens))
        (start, samples0, tokens0), (end, samples1, tokens1) = self._marks[0], self._marks[-1]
        has_tokens = tokens1 is not None
        tokens = (tokens1 - (tokens0 if tokens0 is not None else 0)) if has_tokens else 0
        counts = torch.tensor([samples1 - samples0, float(tokens), end - start], dtype=torch.float64)
        processes = accelerator.num_processes
        if processes > 1:  # one all-reduce: totals of samples and tokens, mean of the elapsed time
            counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
        total_samples, total_tokens, elapsed = counts.tolist()
        elapsed /= processes
        if elapsed <= 0:
            return
        values = {"samples_per_sec": total_samples / elapsed}
        if has_tokens:
            values["tokens_per_sec"] = total_tokens / elapsed
        if self.flops_per_sample is not None:
            values["flops_per_sec"] = self.flops_per_sample * values["samples_per_sec"]
            if self._peak is not None:
                values["mfu"] = values["flops_per_sec"] / (self._peak * processes)
        for name, value in values.items():
            trainer.log(PREFIX + name, value)

    def on_validation_start(self, trainer: TrainerView) -> None:
        """Validation begins: stop the training clock (validation time is not training throughput)."""
        if trainer.fitting:
            self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        """Validation ended: restart the training clock."""
        if self._paused_at is not None:
            self._paused += time.perf_counter() - self._paused_at
            self._paused_at = None

    def on_exception(self, trainer: TrainerView, exception: BaseException) -> None:
        """``fit`` is failing: close the FLOP counter if it is still open."""
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(type(exception), exception, None)

    def state_dict(self) -> dict[str, Any]:
        """The FLOPs per sample, once measured, so a resumed run does not count them again."""
        return {"flops_per_sample": self.flops_per_sample}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back the FLOPs per sample measured before the checkpoint."""
        if self.flops_per_sample is None and state.get("flops_per_sample") is not None:
            self.flops_per_sample = float(state["flops_per_sample"])
