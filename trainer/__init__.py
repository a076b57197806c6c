"""A PyTorch training framework: a low-code ``Accelerator`` and the process-wide ``PartialState``.

    from trainer import Accelerator
    accelerator = Accelerator()
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)

The built-in callbacks and strategies are also ``trainer.callbacks`` and ``trainer.strategies``:
the same modules under names that a ``callbacks.py`` or ``strategies.py`` of your own cannot
shadow (see ``trainer.siblings``).
"""

# First: its import installs the finder that the imports below rely on (see trainer.siblings).
from trainer import siblings  # noqa: F401
from trainer.accelerator import Accelerator
from trainer.accumulation import GradientAccumulation
from trainer.data_loader import PreparedDataLoader, SeededRandomSampler, skip_first_batches
from trainer.inference import (
    Inferencer,
    cpu_offload,
    disk_offload,
    dispatch_model,
    infer_auto_device_map,
    init_empty_weights,
    init_on_device,
    load_checkpoint_and_dispatch,
)
from trainer.notebook import debug_launcher, notebook_launcher
from trainer.parallelism import ParallelismConfig
from trainer.precision import Float16Precision, MixedPrecision, Precision, resolve_precision
from trainer.random_state import set_seed
from trainer.state import PartialState
from trainer.trainer import Trainer
from trainer.utils import (
    AutocastKwargs,
    DataLoaderConfiguration,
    DDPCommunicationHookType,
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    ProfileKwargs,
    find_executable_batch_size,
    is_rich_available,
    synchronize_rng_states,
)
from trainer.wrappers import AcceleratedOptimizer, AcceleratedScheduler

__version__ = "0.1.0"

__all__ = [
    "AutocastKwargs",
    "DDPCommunicationHookType",
    "DataLoaderConfiguration",
    "DeepSpeedPlugin",
    "DistributedDataParallelKwargs",
    "DistributedType",
    "FullyShardedDataParallelPlugin",
    "GradScalerKwargs",
    "InitProcessGroupKwargs",
    "find_executable_batch_size",
    "ProfileKwargs",
    "debug_launcher",
    "is_rich_available",
    "skip_first_batches",
    "synchronize_rng_states",
    "AcceleratedOptimizer",
    "AcceleratedScheduler",
    "Accelerator",
    "Float16Precision",
    "GradientAccumulation",
    "Inferencer",
    "MixedPrecision",
    "ParallelismConfig",
    "PartialState",
    "Precision",
    "PreparedDataLoader",
    "SeededRandomSampler",
    "Trainer",
    "cpu_offload",
    "disk_offload",
    "dispatch_model",
    "infer_auto_device_map",
    "init_empty_weights",
    "init_on_device",
    "load_checkpoint_and_dispatch",
    "notebook_launcher",
    "prepare_pippy",
    "resolve_precision",
    "set_seed",
]


def __getattr__(name: str) -> object:
    """``prepare_pippy`` is imported on first use (torch's pipelining module takes a second to import);
    Accelerate's top-level names that cannot mean the same here refuse when used (``trainer.utils.unavailable``)."""
    if name == "prepare_pippy":
        from trainer.inference.pipeline import prepare_pippy

        return prepare_pippy
    if name == "load_checkpoint_in_model":
        from trainer.inference.load_in_model import load_checkpoint_in_model

        return load_checkpoint_in_model
    from trainer.utils.unavailable import refusing_getattr

    return refusing_getattr("trainer", ("cpu_offload_with_hook",))(name)
