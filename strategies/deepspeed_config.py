"""The DeepSpeed config: the user's dict or JSON file, the strategy's arguments merged in, its ``"auto"`` values resolved.

A DeepSpeed config may leave values ``"auto"`` for the run to fill: the per-process batch size,
the accumulation steps, fp16/bf16, gradient clipping, the optimizer's hyperparameters. The
strategy's arguments and the run's facts fill them here; a concrete value that disagrees with the
run is one error naming both, never silently overridden.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# ZeRO sizes a config may leave "auto": DeepSpeed's own defaults apply when the model does not say better.
AUTO_ZERO_SIZES = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                   "allgather_bucket_size", "sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance")


class ConfigOptimizer(torch.optim.Optimizer):
    """Stands for the optimizer that the DeepSpeed config's ``optimizer`` section describes.

    Prepare it like any optimizer (``accelerator.prepare(model, ConfigOptimizer(model.parameters()))``)
    so that the training loop keeps calling ``optimizer.step()``/``zero_grad()``. When the engine
    is built, DeepSpeed creates the real optimizer from the config and this object then shows
    that optimizer's ``param_groups`` and ``state``, so an LR scheduler made on it drives the real
    one. ``lr``, ``weight_decay``, ``betas`` and ``eps`` given here fill the config's ``"auto"`` values.
    """

    def __init__(self, params: Iterable[Any], **defaults: Any) -> None:
        defaults.setdefault("lr", 1e-3)
        super().__init__(params, defaults)

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        raise RuntimeError("ConfigOptimizer only stands for the DeepSpeed config's optimizer: prepare it with the "
                           "Accelerator, whose optimizer.step() steps the engine.")


class ConfigScheduler:
    """Stands for the LR scheduler that the DeepSpeed config's ``scheduler`` section describes.

    Prepare it like a scheduler; DeepSpeed builds the real one with the engine and steps it at each
    optimizer step, so ``step()`` here does nothing. ``warmup_num_steps`` and ``total_num_steps``
    (counted over all processes, as for a scheduler sized from the unprepared loader) fill the
    section's ``"auto"`` values; ``lr_scheduler_callable(optimizer)`` builds a scheduler instead.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int | None = None, warmup_num_steps: int = 0,
                 lr_scheduler_callable: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        self.optimizer = optimizer
        self.total_num_steps, self.warmup_num_steps = total_num_steps, warmup_num_steps
        self.lr_scheduler_callable, self.kwargs = lr_scheduler_callable, kwargs
        self.engine_scheduler: Any = None  # set when the engine is built
        self._pending: dict[str, Any] | None = None

    def auto_values(self, num_processes: int, split_batches: bool) -> dict[str, Any]:
        """The section's ``"auto"`` parameters this scheduler fills (steps per process)."""
        values: dict[str, Any] = {"warmup_num_steps": self.warmup_num_steps}
        if self.total_num_steps is not None:
            values["total_num_steps"] = self.total_num_steps if split_batches else \
                math.ceil(self.total_num_steps / num_processes)
        return values

    def attach(self, engine_scheduler: Any) -> None:
        self.engine_scheduler = engine_scheduler
        if self._pending is not None and engine_scheduler is not None:
            engine_scheduler.load_state_dict(self._pending)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the engine steps the real scheduler with the optimizer."""

    def get_last_lr(self) -> list[float]:
        if self.engine_scheduler is not None and hasattr(self.engine_scheduler, "get_last_lr"):
            return list(self.engine_scheduler.get_last_lr())
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return dict(self.engine_scheduler.state_dict()) if self.engine_scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.engine_scheduler is not None:
            self.engine_scheduler.load_state_dict(state)
        else:
            self._pending = state


def check_scheduler(config: dict[str, Any], scheduler: Any) -> None:
    """Refuse a scheduler that would be stepped twice, or a stand-in for a section the config lacks."""
    in_config = "scheduler" in config
    if isinstance(scheduler, ConfigScheduler):
        if not in_config and scheduler.lr_scheduler_callable is None:
            raise ValueError("DummyScheduler stands for the DeepSpeed config's scheduler, and the config has no "
                             "'scheduler' section: add one, pass lr_scheduler_callable=, or prepare a torch scheduler.")
    elif in_config:
        raise ValueError(f"The DeepSpeed config has a 'scheduler' section, which the engine steps, and a "
                         f"{type(scheduler).__name__} was prepared too: prepare DummyScheduler(optimizer, ...) to use "
                         "the config's, or remove the section to use yours.")


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def build_config(config: dict[str, Any] | str | os.PathLike | None, *, zero_stage: int | None,
                 offload_optimizer_device: str | None, offload_param_device: str | None,
                 offload_optimizer_nvme_path: str | None, offload_param_nvme_path: str | None,
                 gradient_clipping: float | None, gradient_accumulation_steps: int | None,
                 zero3_save_16bit_model: bool | None) -> dict[str, Any]:
    """The config with the constructor's arguments put in; a concrete value that disagrees is an error."""
    config = load_config(config)
    zero = config.setdefault("zero_optimization", {})
    if zero_stage is not None:
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"DeepSpeed(zero_stage={zero_stage!r}): use 0, 1, 2 or 3.")
        _agree(zero, "stage", zero_stage, "zero_stage", "zero_optimization.stage")
    zero.setdefault("stage", 2)
    if is_auto(zero["stage"]):
        zero["stage"] = 2
    for kind, device, path in (("optimizer", offload_optimizer_device, offload_optimizer_nvme_path),
                               ("param", offload_param_device, offload_param_nvme_path)):
        if device is None:
            continue
        if device not in OFFLOAD_DEVICES:
            raise ValueError(f"DeepSpeed(offload_{kind}_device={device!r}): use one of {list(OFFLOAD_DEVICES)}.")
        if device == "none" and f"offload_{kind}" not in zero:
            continue
        section = zero.setdefault(f"offload_{kind}", {})
        _agree(section, "device", device, f"offload_{kind}_device", f"zero_optimization.offload_{kind}.device")
        if path is not None:
            _agree(section, "nvme_path", path, f"offload_{kind}_nvme_path", f"zero_optimization.offload_{kind}.nvme_path")
    if gradient_clipping is not None:
        _agree(config, "gradient_clipping", float(gradient_clipping), "gradient_clipping", "gradient_clipping")
    if gradient_accumulation_steps is not None:
        _agree(config, "gradient_accumulation_steps", int(gradient_accumulation_steps), "gradient_accumulation_steps",
               "gradient_accumulation_steps")
    if zero3_save_16bit_model is not None:
        _agree(zero, "stage3_gather_16bit_weights_on_model_save", bool(zero3_save_16bit_model), "zero3_save_16bit_model",
               "zero_optimization.stage3_gather_16bit_weights_on_model_save")
    if config.get("managed_gradient_accumulation") not in (None, False):
        raise ValueError("The DeepSpeed config sets managed_gradient_accumulation: the Accelerator's accumulation "
                         "policy decides when the optimizer steps; remove the key.")
    return config


def uses_nvme(config: dict[str, Any]) -> bool:
    """Whether optimizer state or parameters are offloaded to NVMe (which only DeepSpeed's own checkpoints hold)."""
    zero = config["zero_optimization"]
    return any((zero.get(f"offload_{kind}") or {}).get("device") == "nvme" for kind in ("optimizer", "param"))


def check_accumulation(config: dict[str, Any], steps: int) -> None:
    """The config's gradient_accumulation_steps, when concrete, must be the Accelerator's."""
    configured = config.get("gradient_accumulation_steps")
    if configured is not None and not is_auto(configured) and int(configured) != steps:
        raise ValueError(
            f"The DeepSpeed config says gradient_accumulation_steps={configured}, but the Accelerator accumulates "
            f"{steps} micro-batches per step. Make them agree (Accelerator(gradient_accumulation_steps={configured}) "
            "or Trainer(accumulate=...)), or set the config's value to \"auto\"."
        )


def check_clipping(config: dict[str, Any], max_norm: float) -> None:
    """The config's gradient_clipping, when concrete, must be what ``clip_grad_norm_`` asks for."""
    configured = config.get("gradient_clipping")
    if configured is not None and not is_auto(configured) and float(configured) != float(max_norm):
        raise ValueError(f"The DeepSpeed config clips gradients to {configured}, and clip_grad_norm_ asks for "
                         f"{max_norm}. Make them agree, or set the config's gradient_clipping to \"auto\".")


def resolve_config(config: dict[str, Any], *, steps: int, batch_size: int | None, num_processes: int,
                   precision_sections: dict[str, bool], precision_name: str, clip: float | None,
                   optimizer_defaults: dict[str, Any], scheduler_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config the engine is built with: every ``"auto"`` filled from the run, every clash an error.

    ``precision_sections`` says which of DeepSpeed's ``fp16``/``bf16`` sections the run's precision
    enables; ``optimizer_defaults`` fill the config optimizer's ``"auto"`` hyperparameters.
    """
    config = copy.deepcopy(config)
    check_accumulation(config, steps)
    config["gradient_accumulation_steps"] = steps
    micro = config.get("train_micro_batch_size_per_gpu")
    if micro is None or is_auto(micro):
        micro = batch_size or 1  # without a prepared loader it only feeds DeepSpeed's sample counters
    elif batch_size is not None and int(micro) != batch_size:
        raise ValueError(f"The DeepSpeed config says train_micro_batch_size_per_gpu={micro}, but the prepared data "
                         f"loader gives each process batches of {batch_size}. Make them agree, or set it to \"auto\".")
    config["train_micro_batch_size_per_gpu"] = int(micro)
    total = int(micro) * steps * num_processes
    if config.get("train_batch_size") not in (None, "auto") and int(config["train_batch_size"]) != total:
        raise ValueError(f"The DeepSpeed config says train_batch_size={config['train_batch_size']}, but this run's "
                         f"global batch is {total} ({micro} per process x {steps} accumulation steps x "
                         f"{num_processes} processes). Make them agree, or set it to \"auto\".")
    config["train_batch_size"] = total
    for section, wanted in precision_sections.items():
        current = config.get(section, {})
        enabled = current.get("enabled", "auto") if isinstance(current, dict) else current
        if is_auto(enabled) or (section not in config and not wanted):
            config[section] = {**(current if isinstance(current, dict) else {}), "enabled": wanted}
        elif bool(enabled) != wanted:
            raise ValueError(f"The DeepSpeed config has {section}.enabled={enabled}, but the Accelerator's precision is "
                             f"{precision_name!r}. Make them agree, or set it to \"auto\".")
    configured_clip = config.get("gradient_clipping")
    if configured_clip is None or is_auto(configured_clip):
        config["gradient_clipping"] = float(clip or 0.0)
    config["managed_gradient_accumulation"] = False
    config.setdefault("zero_allow_untested_optimizer", True)
    _fill_optimizer_autos(config, optimizer_defaults)
    section = (config.get("scheduler") or {}).get("params", {})
    for key, value in (scheduler_values or {}).items():
        if is_auto(section.get(key)):
            section[key] = value
    _drop_auto_zero_sizes(config["zero_optimization"])
    left = _auto_paths(config)
    if left:
        raise ValueError(f"The DeepSpeed config leaves {left} as \"auto\", which the run does not determine: give "
                         "them values.")
    return config


def zero_init_config(config: dict[str, Any], precision_sections: dict[str, bool]) -> dict[str, Any]:
    """What ``deepspeed.zero.Init`` needs to partition a model as it is built (before the run's other facts are known)."""
    init = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": copy.deepcopy(config["zero_optimization"]),
            **{section: {"enabled": on} for section, on in precision_sections.items()}}
    _drop_auto_zero_sizes(init["zero_optimization"])
    return init


def _drop_auto_zero_sizes(zero: dict[str, Any]) -> None:
    for key in AUTO_ZERO_SIZES:
        if is_auto(zero.get(key)):
            del zero[key]


def _fill_optimizer_autos(config: dict[str, Any], defaults: dict[str, Any]) -> None:
    params = (config.get("optimizer") or {}).get("params", {})
    for key, value in list(params.items()):
        if is_auto(value) and key in defaults:
            params[key] = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
    scheduler = (config.get("scheduler") or {}).get("params", {})
    lr = params.get("lr", defaults.get("lr"))
    if is_auto(scheduler.get("warmup_max_lr")) and lr is not None and not is_auto(lr):
        scheduler["warmup_max_lr"] = lr
    if is_auto(scheduler.get("warmup_min_lr")):
        scheduler["warmup_min_lr"] = 0.0


def load_config(config: dict[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    """A DeepSpeed config from a dict (copied), a JSON file's path, or None (empty)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"No DeepSpeed config file at {path}.")
    loaded = json.loads(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object, got {type(loaded).__name__}.")
    return loaded


def _agree(section: dict[str, Any], key: str, value: Any, argument: str, where: str) -> None:
    current = section.get(key)
    if current is None or is_auto(current) or current == value:
        section[key] = value
        return
    raise ValueError(f"DeepSpeed({argument}={value!r}) disagrees with the DeepSpeed config's {where}={current!r}: "
                     "give one of them, or make them agree.")


def _auto_paths(config: Any, prefix: str = "") -> list[str]:
    if isinstance(config, dict):
        return [path for key, value in config.items() for path in _auto_paths(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if is_auto(config) else []
