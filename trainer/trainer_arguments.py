"""The Trainer's arguments: checked once, with one clear error; Lightning's and the HF Trainer's names pointed to ours."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from trainer.arguments import unknown_argument_error

# What users of Lightning's Trainer and of transformers' TrainingArguments/Trainer write, and ours.
FOREIGN_NAMES = {
    "gradient_clip_val": "grad_clip", "max_grad_norm": "grad_clip",
    "val_check_interval": "eval_every_n_steps", "eval_steps": "eval_every_n_steps",
    "check_val_every_n_epoch": "eval_every_n_epochs",
    "accumulate_grad_batches": "accumulate", "gradient_accumulation_steps": "accumulate",
    "num_train_epochs": "max_epochs", "logging_steps": "log_every_n_steps",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "default_root_dir": "output_dir",
    "logger": "trackers", "loggers": "trackers", "report_to": "trackers",
    "enable_progress_bar": "progress_bar", "enable_checkpointing": "checkpoint",
    "enable_model_summary": "model_summary",
    "limit_val_batches": "limit_eval_batches", "train_dataset": "train_data", "eval_dataset": "eval_data",
    "data_collator": "collate_fn", "dataloader_num_workers": "num_workers", "processing_class": "tokenizer",
    "fp16": "precision='fp16'", "bf16": "precision='bf16'",
    "learning_rate": "an optimizer (optimizer=, or configure_optimizers)",
    "lr_scheduler": "scheduler", "optimizers": "optimizer and scheduler",
}


def refuse_unknown(function: Callable[..., Any], unknown: Mapping[str, Any]) -> None:
    """Raise one TypeError for the first keyword ``Trainer`` does not take, naming ours where it is another's."""
    if unknown:
        hints = {name: f"That is Lightning's or the HF Trainer's name: here use {ours}"
                       f"{'=...' if '=' not in ours and ' ' not in ours else ''}." for name, ours in FOREIGN_NAMES.items()}
        raise unknown_argument_error("Trainer", function, unknown, hints)


def _whole(name: str, value: Any, least: int, optional: bool) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}{', or None;' if optional else ','} got {value!r}.")


def check_numbers(*, batch_size: Any, max_epochs: Any, log_every_n_steps: Any, eval_every_n_steps: Any,
                  eval_every_n_epochs: Any, max_steps: Any, grad_clip: Any) -> None:
    """Each number the Trainer takes is of its type and range (a boolean is not a whole number here)."""
    _whole("batch_size", batch_size, 1, False)
    _whole("log_every_n_steps", log_every_n_steps, 1, False)
    _whole("max_epochs", max_epochs, 0, True)
    for name, value in (("eval_every_n_steps", eval_every_n_steps), ("eval_every_n_epochs", eval_every_n_epochs),
                        ("max_steps", max_steps)):
        _whole(name, value, 1, True)
    if grad_clip is not None and (isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float))
                                  or not grad_clip > 0):
        raise ValueError(f"grad_clip must be a positive number, or None; got {grad_clip!r}.")


def epochs_to_train(max_epochs: int | None, max_steps: int | None) -> int | None:
    """``max_epochs``, else unbounded when ``max_steps`` is given (it ends the run), else 1."""
    if max_epochs is not None:
        return max_epochs
    return None if max_steps is not None else 1


def as_duration(value: Any) -> timedelta | None:
    """``max_time`` as a timedelta: ``"DD:HH:MM:SS"``, a timedelta, a dict of timedelta's arguments, or seconds."""
    if value is None or isinstance(value, timedelta):
        return value
    if isinstance(value, Mapping):
        return timedelta(**value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) == 4 and all(part.strip().isdigit() for part in parts):
            days, hours, minutes, seconds = map(int, parts)
            return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    raise ValueError(f"max_time={value!r}: use 'DD:HH:MM:SS' (e.g. '00:12:00:00' for 12 hours), a datetime.timedelta, "
                     "a dict such as {'hours': 12}, or a number of seconds.")


def compile_plugin(compile: Any) -> Any:
    """``Trainer(compile=...)`` as the Accelerator's ``TorchDynamoPlugin`` (None: no compiling)."""
    from trainer.utils.dynamo import TorchDynamoPlugin

    if compile is None or compile is False:
        return None
    if compile is True:
        return TorchDynamoPlugin(backend="inductor")
    if isinstance(compile, Mapping):
        allowed = ("backend", "mode", "fullgraph", "dynamic", "options", "use_regional_compilation")
        unknown = sorted(set(compile) - set(allowed))
        if unknown:
            raise ValueError(f"compile={dict(compile)!r}: unknown keys {unknown}; torch.compile's arguments here are "
                             f"{list(allowed)}.")
        return TorchDynamoPlugin(**{"backend": "inductor", **compile})
    raise ValueError(f"compile={compile!r}: use True, False or a dict of torch.compile arguments ({{'mode': ...}}).")
