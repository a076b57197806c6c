"""Accelerate's ``accelerate.big_modeling`` path: big-model loading and offload, from ``trainer.inference``."""

from trainer.inference import (
    cpu_offload,
    disk_offload,
    dispatch_model,
    init_empty_weights,
    init_on_device,
    load_checkpoint_and_dispatch,
)
from trainer.inference.load_in_model import load_checkpoint_in_model
from trainer.utils.modeling import infer_auto_device_map
from trainer.utils.unavailable import refusing_getattr

# cpu_offload_with_hook and the other names that cannot mean the same here refuse with the reason.
__getattr__ = refusing_getattr("trainer.big_modeling")


__all__ = ["cpu_offload", "disk_offload", "dispatch_model", "infer_auto_device_map", "init_empty_weights",
           "init_on_device", "load_checkpoint_and_dispatch", "load_checkpoint_in_model"]
