"""Big-model inference: meta-device init, device maps, checkpoint loading, offload, dispatch, the Inferencer."""

from trainer.inference.device_map import DeviceMapError, find_tied_parameters, get_max_memory, infer_auto_device_map
from trainer.inference.dispatch import cpu_offload, disk_offload, dispatch_model, load_checkpoint_and_dispatch, remove_dispatch
from trainer.inference.inferencer import Inferencer
from trainer.inference.meta import init_empty_weights, init_on_device
from trainer.inference.quantization import QuantizationConfig, quantize_model
from trainer.inference.sizes import module_sizes, parse_size

__all__ = [
    "DeviceMapError", "Inferencer", "QuantizationConfig", "quantize_model",
    "cpu_offload", "disk_offload", "dispatch_model", "find_tied_parameters",
    "get_max_memory", "infer_auto_device_map", "init_empty_weights", "init_on_device", "load_checkpoint_and_dispatch",
    "module_sizes", "parse_size", "remove_dispatch",
]


def __getattr__(name: str) -> object:
    """``prepare_pippy`` is imported on first use: torch's pipelining module takes a second to import."""
    if name == "prepare_pippy":
        from trainer.inference.pipeline import prepare_pippy

        return prepare_pippy
    raise AttributeError(f"module 'trainer.inference' has no attribute {name!r}")
