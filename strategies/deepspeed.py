"""DeepSpeed: ZeRO stages 1-3 (optimizer state, gradients, parameters partitioned) behind the Strategy interface.

The engine is built once the model, its optimizer and the run's facts are known: at the first
forward (or the first checkpoint load), because a Trainer prepares its data loaders after its
model and optimizer, and the per-process batch size is one of the values a DeepSpeed config may
leave ``"auto"``. Until then the prepared model is a thin module around the user's module.

The Accelerator's accumulation policy owns the accumulation boundary: the engine runs in
DeepSpeed's unmanaged-accumulation mode, ``backward`` leaves the loss as the policy divided it,
and the engine steps exactly when the prepared optimizer's ``step`` runs at a boundary. So N
processes of batch b under ZeRO train like DDP, and like one process of batch N*b.

The DeepSpeed config and its ``"auto"`` values are ``strategies.deepspeed_config``'s; the
checkpoint files (each process's ZeRO partitions in safetensors plus JSON) are
``strategies.deepspeed_checkpoint``'s.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import deepspeed_checkpoint as checkpoint_files
from .base import Strategy
from .deepspeed_config import (
    ConfigOptimizer,
    ConfigScheduler,
    build_config,
    check_accumulation,
    check_clipping,
    check_scheduler,
    resolve_config,
    uses_nvme,
    zero_init_config,
)
from .deepspeed_wrappers import DeepSpeedModule, EngineScaledPrecision
from .policies import AccumulationPolicy, PrecisionPolicy
from .spec import Option, Package, StrategySpec

PACKAGE = Package("deepspeed", "deepspeed", "pip install 'trainer-kit[deepspeed]'")
MINIMUM_VERSION = (0, 19, 4)  # the first release whose engine lets the caller own the accumulation boundary
CHECKPOINT_FORMATS = ("safetensors", "deepspeed")
_LAUNCHER_ONLY = "Read by a multi-machine launcher; a running process has no use for it."


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError(f"{PACKAGE.missing_message('The DeepSpeed strategy')} ({error})") from error
    from packaging.version import Version

    if Version(deepspeed.__version__).release < MINIMUM_VERSION:
        # Older engines ignore the unmanaged-accumulation switch and would step on their own schedule.
        raise ImportError(f"The DeepSpeed strategy needs deepspeed>={'.'.join(map(str, MINIMUM_VERSION))}, found "
                          f"{deepspeed.__version__}. Upgrade it with: {PACKAGE.install}")
    # The engine calls two torch collectives under their deprecated names on every step; the
    # warnings say nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)
    return deepspeed


class DeepSpeed(Strategy):
    """Train with a DeepSpeed engine: ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters).

    Args:
        config: a DeepSpeed config (a dict, or the path of a JSON file). ``"auto"`` values are
            filled from the run: the per-process batch size from the prepared data loader,
            ``gradient_accumulation_steps`` from the Accelerator, ``fp16``/``bf16`` from its
            precision, ``gradient_clipping`` from ``accelerator.clip_grad_norm_``.
        zero_stage: 0-3; by default the config's, else 2.
        offload_optimizer_device: where the optimizer state lives: ``"none"`` (the device), ``"cpu"`` or ``"nvme"``.
        offload_param_device: where the parameters live under ZeRO-3: ``"none"``, ``"cpu"`` or ``"nvme"``.
        gradient_clipping: max gradient norm, clipped by the engine at every step.
        gradient_accumulation_steps: must agree with the Accelerator's (checked, never silently used).
        zero3_init_flag: build models inside ``module_sharded_context()`` already partitioned (ZeRO-3).
        offload_optimizer_nvme_path: where NVMe optimizer offload writes.
        offload_param_nvme_path: where NVMe parameter offload writes.
        zero3_save_16bit_model: under ZeRO-3, ``save_model`` gathers the training-dtype (16-bit under
            fp16/bf16) weights; otherwise it consolidates the fp32 master weights.
        checkpoint_format: ``"safetensors"`` (each process's partitions, nothing pickled) or
            ``"deepspeed"`` (DeepSpeed's own pickled files; NVMe offload always uses them).
        trust_deepspeed_checkpoints: allow loading DeepSpeed's own pickled checkpoint files, which
            can run code when read: only for checkpoints you wrote yourself.
    """

    spec = StrategySpec(
        name="deepspeed", summary="a DeepSpeed engine: ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)",
        distributed_types=("DEEPSPEED",), section="deepspeed_config", package=PACKAGE,
        options=(
            Option("zero_stage", "zero_stage", (int,), "ZeRO stage: 0 none, 1 optimizer state, 2 + gradients, 3 + parameters.",
                   choices=(0, 1, 2, 3), question="ZeRO stage?", ask_default=2),
            Option("gradient_accumulation_steps", "gradient_accumulation_steps", (int,),
                   "Micro-batches per optimizer step; must agree with the Accelerator's.", minimum=1,
                   question="Gradient accumulation steps?", ask_default=1, flag=False),  # the launcher's own flag sets it
            Option("gradient_clipping", "gradient_clipping", (int, float), "Maximum gradient norm."),
            Option("offload_optimizer_device", "offload_optimizer_device", (str,), "Where the optimizer state is offloaded.",
                   choices=("none", "cpu", "nvme"), question="Offload the optimizer to?", ask_default="none"),
            Option("offload_param_device", "offload_param_device", (str,), "Where parameters are offloaded (ZeRO-3).",
                   choices=("none", "cpu", "nvme")),
            Option("offload_optimizer_nvme_path", "offload_optimizer_nvme_path", (str, type(None)),
                   "Directory for NVMe optimizer offload."),
            Option("offload_param_nvme_path", "offload_param_nvme_path", (str, type(None)),
                   "Directory for NVMe parameter offload."),
            Option("zero3_init_flag", "zero3_init_flag", (bool,), "Build the model already partitioned (ZeRO-3)."),
            Option("zero3_save_16bit_model", "zero3_save_16bit_model", (bool,),
                   "Gather a 16-bit copy of the weights when saving under ZeRO-3."),
            Option("deepspeed_config_file", "config", (str, type(None)), "A DeepSpeed JSON config used with these keys."),
            Option("deepspeed_hostfile", None, (str, type(None)), "DeepSpeed's hostfile for multi-machine launches.",
                   unused=_LAUNCHER_ONLY),
            Option("deepspeed_multinode_launcher", None, (str,), "The launcher DeepSpeed uses across machines.",
                   choices=("pdsh", "standard", "openmpi", "mvapich", "mpich", "nossh"), unused=_LAUNCHER_ONLY),
            Option("deepspeed_inclusion_filter", None, (str, type(None)), "DeepSpeed's `--include` filter of hosts/devices.",
                   unused=_LAUNCHER_ONLY),
            Option("deepspeed_exclusion_filter", None, (str, type(None)), "DeepSpeed's `--exclude` filter of hosts/devices.",
                   unused=_LAUNCHER_ONLY),
        ))

    def __init__(self, config: dict[str, Any] | str | os.PathLike | None = None, zero_stage: int | None = None,
                 offload_optimizer_device: str | None = None, offload_param_device: str | None = None,
                 gradient_clipping: float | None = None, zero3_init_flag: bool = False,
                 zero3_save_16bit_model: bool | None = None, gradient_accumulation_steps: int | None = None,
                 offload_optimizer_nvme_path: str | None = None, offload_param_nvme_path: str | None = None,
                 checkpoint_format: str = "safetensors", trust_deepspeed_checkpoints: bool = False) -> None:
        super().__init__()
        PACKAGE.require("The DeepSpeed strategy")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"DeepSpeed(checkpoint_format={checkpoint_format!r}): use one of {list(CHECKPOINT_FORMATS)}.")
        self.config = build_config(
            config, zero_stage=zero_stage, offload_optimizer_device=offload_optimizer_device,
            offload_param_device=offload_param_device, offload_optimizer_nvme_path=offload_optimizer_nvme_path,
            offload_param_nvme_path=offload_param_nvme_path, gradient_clipping=gradient_clipping,
            gradient_accumulation_steps=gradient_accumulation_steps, zero3_save_16bit_model=zero3_save_16bit_model)
        self.zero3_init_flag = zero3_init_flag
        self.checkpoint_format = checkpoint_format
        self.trust_deepspeed_checkpoints = trust_deepspeed_checkpoints
        self._engine: Any = None
        self._wrapper: DeepSpeedModule | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: Any = None  # the prepared LR scheduler (a ConfigScheduler stands for the config's)
        self._split_batches = False
        self._precision: PrecisionPolicy | None = None
        self._accumulation: AccumulationPolicy | None = None
        self._batch_size: int | None = None
        self._clip: float | None = None
        self._pending_backwards = 0
        self.last_step_applied = True

    # -- the configuration -----------------------------------------------------------------------------
    @property
    def zero_stage(self) -> int:
        return int(self.config["zero_optimization"]["stage"])

    @property
    def zero3_save_16bit_model(self) -> bool:
        return bool(self.config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False))

    def _precision_sections(self) -> dict[str, bool]:
        """Which of DeepSpeed's ``fp16``/``bf16`` config sections the run's precision enables."""
        dtype = self._precision.dtype if self._precision is not None and self._precision.is_mixed else None
        return {"fp16": dtype == torch.float16, "bf16": dtype == torch.bfloat16}

    def resolved_config(self) -> dict[str, Any]:
        """The config the engine is built with: every ``"auto"`` filled from the run, every clash an error."""
        return resolve_config(
            self.config, steps=self._accumulation.steps if self._accumulation is not None else 1,
            batch_size=self._batch_size, num_processes=self.num_processes, precision_sections=self._precision_sections(),
            precision_name=self._precision.name if self._precision is not None else "no", clip=self._clip,
            optimizer_defaults=self._optimizer.defaults if isinstance(self._optimizer, ConfigOptimizer) else {},
            scheduler_values=self._scheduler.auto_values(self.num_processes, self._split_batches)
            if isinstance(self._scheduler, ConfigScheduler) else None)

    # -- environment and the run's policies ---------------------------------------------------------------
    def setup_environment(self, device: torch.device, process_index: int = 0, num_processes: int = 1) -> None:
        if device.type == "cpu":
            # DeepSpeed picks its device backend when first imported; a CPU run must not probe for a GPU.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().setup_environment(device, process_index, num_processes)

    def setup_policies(self, precision: PrecisionPolicy, accumulation: AccumulationPolicy) -> PrecisionPolicy:
        """Keep both policies for the engine's config; return a policy that leaves loss scaling to the engine."""
        if accumulation.normalize != "mean":
            raise ValueError("Token-normalised accumulation divides the gradients at the boundary, which the DeepSpeed "
                             "engine owns: use accumulation_normalize='mean' with this strategy.")
        check_accumulation(self.config, accumulation.steps)
        self._precision, self._accumulation = precision, accumulation
        return EngineScaledPrecision(precision, self)

    def observe_batch_size(self, batch_size: int | None) -> None:
        if self._batch_size is None and batch_size:
            self._batch_size = int(batch_size)

    # -- model and optimizer ------------------------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        if not any(p.requires_grad for p in module.parameters()):
            return module.to(self.root_device)  # a frozen model (a teacher) needs no engine
        if self._wrapper is not None:
            raise ValueError("The DeepSpeed strategy trains one model: this Accelerator has prepared one already. "
                             "Prepare models without trainable parameters freely; train several models with one "
                             "Accelerator each.")
        self._wrapper = DeepSpeedModule(module, self)
        return self._wrapper

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self._engine is not None:
            raise ValueError("Prepare the optimizer before the model's first forward: the DeepSpeed engine is built "
                             "then, from the model and its optimizer.")
        if self._optimizer is not None:
            raise ValueError("The DeepSpeed strategy steps one optimizer, and one is prepared already.")
        if optimizer.state:
            raise ValueError("Prepare the optimizer before it has stepped: the DeepSpeed engine partitions its state.")
        in_config = "optimizer" in self.config
        if in_config and not isinstance(optimizer, ConfigOptimizer):
            raise ValueError(f"The DeepSpeed config has an 'optimizer' section and a {type(optimizer).__name__} was "
                             "prepared too. Prepare ConfigOptimizer(model.parameters()) to use the config's, or remove "
                             "the section to use yours.")
        if isinstance(optimizer, ConfigOptimizer) and not in_config:
            raise ValueError("ConfigOptimizer stands for the DeepSpeed config's optimizer, and the config has no "
                             "'optimizer' section: add one, or prepare a torch optimizer.")
        self._optimizer = optimizer
        return optimizer

    def setup_scheduler(self, scheduler: Any, split_batches: bool = False) -> Any:
        if self._engine is not None:
            raise ValueError("Prepare the scheduler before the model's first forward: the DeepSpeed engine is built then.")
        check_scheduler(self.config, scheduler)
        self._scheduler, self._split_batches = scheduler, split_batches
        return scheduler

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DeepSpeedModule) else module

    @property
    def engine(self) -> Any:
        """The DeepSpeed engine, built on first use."""
        if self._engine is None:
            self._build_engine()
        return self._engine

    def _build_engine(self) -> None:
        if self._wrapper is None:
            raise RuntimeError("The DeepSpeed engine is built from the prepared model: prepare one first.")
        deepspeed = self._ready_deepspeed()
        config = self.resolved_config()
        module, optimizer = self._wrapper.module, self._optimizer
        kwargs: dict[str, Any] = {"model": module, "config": config, "dist_init_required": False}
        if isinstance(optimizer, ConfigOptimizer) or optimizer is None:
            kwargs["model_parameters"] = [p for p in module.parameters() if p.requires_grad]
        else:
            kwargs["optimizer"] = optimizer
        scheduler = self._scheduler if isinstance(self._scheduler, ConfigScheduler) else None
        if scheduler is not None and scheduler.lr_scheduler_callable is not None:
            kwargs["lr_scheduler"] = scheduler.lr_scheduler_callable
        engine, _, _, engine_scheduler = deepspeed.initialize(**kwargs)
        if scheduler is not None:
            scheduler.attach(engine_scheduler)
        if isinstance(optimizer, ConfigOptimizer):
            # The placeholder shows the real optimizer's groups and state (a scheduler made on it drives them).
            real = getattr(engine.optimizer, "optimizer", engine.optimizer)
            optimizer.param_groups, optimizer.state = real.param_groups, real.state
        self._engine = engine
        if self._clip:
            self._set_engine_clip(self._clip)

    def _ready_deepspeed(self) -> Any:
        """Import DeepSpeed with what it reads from a launcher in place: a process group and ``LOCAL_RANK``.

        The engine and ``deepspeed.zero.Init`` read their device from ``LOCAL_RANK``, which torchrun
        sets; other launches (one process started with ``python``, SLURM tasks) may not have it.
        """
        deepspeed = _import_deepspeed()
        self.ensure_process_group()
        os.environ.setdefault("LOCAL_RANK", str(self.root_device.index or 0))
        return deepspeed

    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Any:
        # The engine reduces at the step (ZeRO-0/1) or reduce-scatters every backward into the
        # partitions (ZeRO-2/3, which is how gradients are partitioned): nothing to switch off.
        return nullcontext()

    def backward(self, loss: torch.Tensor, module: nn.Module | None = None, **kwargs: Any) -> None:
        retain_graph = kwargs.pop("retain_graph", False)
        if kwargs:
            raise TypeError(f"backward() under DeepSpeed takes retain_graph only, got {sorted(kwargs)}.")
        # The accumulation policy divided the loss already: the engine must not divide it again.
        self.engine.backward(loss, retain_graph=retain_graph, scale_wrt_gas=False)
        self._pending_backwards += 1

    def gradients_present(self, optimizer: torch.optim.Optimizer) -> bool | None:
        return None  # the engine keeps the gradients in its own partitions

    def optimizer_step(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(f"optimizer.step() under DeepSpeed takes no arguments, got {sorted(kwargs)}.")
        engine = self.engine
        engine.step()
        self._pending_backwards = 0
        self.last_step_applied = bool(engine.was_step_applied())
        return None

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> None:
        """Have the engine clip the gradient norm to ``max_norm`` in its step (the gradients are its partitions).

        The engine computes the norm inside the step, so nothing is returned here; after the step,
        ``last_grad_norm`` holds it.
        """
        if float(norm_type) != 2.0:
            raise ValueError(f"DeepSpeed clips the 2-norm of the gradients; clip_grad_norm_(norm_type={norm_type}) "
                             "is not available with it.")
        check_clipping(self.config, max_norm)
        self._clip = float(max_norm)
        if self._engine is not None:
            self._set_engine_clip(self._clip)
        return None

    def _set_engine_clip(self, max_norm: float) -> None:
        self._engine._config.gradient_clipping = max_norm
        if hasattr(self._engine.optimizer, "clip_grad"):
            self._engine.optimizer.clip_grad = max_norm

    def clip_grad_value_(self, parameters: Iterable[torch.Tensor], clip_value: float) -> None:
        raise ValueError("DeepSpeed clips the gradient norm only: use clip_grad_norm_ (or the config's gradient_clipping).")

    @property
    def last_grad_norm(self) -> float | None:
        """The gradient norm the engine computed in its last step (before clipping), or None."""
        return None if self._engine is None else self._engine.get_global_grad_norm()

    @contextmanager
    def module_sharded_context(self) -> Iterator[None]:
        """With ``zero3_init_flag`` under ZeRO-3: models built here are partitioned as their layers are created."""
        if not (self.zero3_init_flag and self.zero_stage == 3):
            yield
            return
        deepspeed = self._ready_deepspeed()
        with deepspeed.zero.Init(config_dict_or_path=zero_init_config(self.config, self._precision_sections())):
            yield

    # -- optimizer state dicts: partitioned, so only the strategy's checkpoint files hold them ---------------
    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        raise RuntimeError("Under DeepSpeed each process holds only its partition of the optimizer state: save it with "
                           "accelerator.save_state(), which writes every partition.")

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        raise RuntimeError("Under DeepSpeed the optimizer state is partitioned: restore it with accelerator.load_state().")

    # -- full weights --------------------------------------------------------------------------------------------
    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The full weights (under ZeRO-3 gathered from every process: the training-dtype weights with
        ``zero3_save_16bit_model``, the consolidated fp32 master weights otherwise)."""
        if not isinstance(module, DeepSpeedModule):
            return super().full_state_dict(module)
        self.engine  # noqa: B018 - built here if the model has not run yet: the weights live in it
        return checkpoint_files.gather_full_weights(_import_deepspeed(), module.module, self.zero_stage,
                                                    self.zero3_save_16bit_model)

    def save_module(self, module: nn.Module, path: Path) -> None:
        """Rank 0 writes the full weights (``full_state_dict``) as one safetensors file that loads into the plain model."""
        if not isinstance(module, DeepSpeedModule):
            super().save_module(module, path)
            return
        state = self.full_state_dict(module)
        if self.process_index == 0:
            save_file(state, str(path), metadata={"format": "pt"})

    def load_module(self, module: nn.Module, path: Path, strict: bool = True) -> None:
        """Load full weights into the (partitioned) model on every process; the fp32 master weights follow."""
        if not isinstance(module, DeepSpeedModule):
            super().load_module(module, path, strict)
            return
        checkpoint_files.load_full_weights(_import_deepspeed(), self.engine, module.module, path, self.zero_stage, strict)

    # -- checkpoints: each process's partitions ------------------------------------------------------------------
    def save_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        """Write every process's ZeRO partitions (or DeepSpeed's own files, for NVMe offload) into ``directory``."""
        wrapper = self._wrapper
        if wrapper is None or not any(m is wrapper for m in modules):
            return False
        if self._pending_backwards:
            raise RuntimeError("The DeepSpeed engine holds partial gradient sums between optimizer steps, which its "
                               "checkpoint does not include: save at an accumulation boundary (after optimizer.step()).")
        engine = self.engine
        if self.checkpoint_format == "deepspeed" or uses_nvme(self.config):
            engine.save_checkpoint(str(directory / checkpoint_files.NATIVE_DIR), tag="state", save_latest=False)
        else:
            checkpoint_files.save_partitions(engine, wrapper.module, directory / checkpoint_files.PARTITIONS_DIR,
                                             self.zero_stage, self.process_index, self.num_processes)
        for index, module in enumerate(modules):  # models without an engine (frozen ones), as the generic checkpoint would
            if module is not wrapper:
                super().save_module(module, directory / _model_file(index))
        return True

    def load_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        """Read what ``save_training_state`` wrote; False when ``directory`` holds no DeepSpeed state."""
        wrapper = self._wrapper
        if wrapper is None or not any(m is wrapper for m in modules):
            return False
        native, partitions = directory / checkpoint_files.NATIVE_DIR, directory / checkpoint_files.PARTITIONS_DIR
        if native.is_dir():
            checkpoint_files.load_native(self.engine, native, self.trust_deepspeed_checkpoints)
        elif partitions.is_dir():
            checkpoint_files.load_partitions(self.engine, wrapper.module, partitions, self.zero_stage, self.process_index,
                                             self.num_processes)
        else:
            return False
        for index, module in enumerate(modules):
            if module is not wrapper:
                super().load_module(module, directory / _model_file(index))
        self._pending_backwards = 0
        return True

    # -- teardown --------------------------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Release the engine (its hooks and ZeRO-3 partition state) while the process group is still up.

        ZeRO-3 leaves hooks and coordinator state that refer to the process group; dropping them only
        at interpreter exit, after the group is gone, is what made finished runs abort there.
        """
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.destroy()
            del engine
        self._wrapper, self._optimizer, self._scheduler = None, None, None
        import gc

        gc.collect()
        self.release_process_group()


# -- helpers --------------------------------------------------------------------------------------------------------
def _model_file(index: int) -> str:
    """The generic checkpoint's file name for the ``index``-th prepared model."""
    return f"{'model' if index == 0 else f'model_{index}'}.safetensors"
