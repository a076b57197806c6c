"""DeepSpeed: ZeRO stages 1-3 (optimizer state, gradients, parameters partitioned) behind the Strategy interface.

The engine is built once the model, its optimizer and the run's facts are known: at the first
forward (or the first checkpoint load), because a Trainer prepares its data loaders after its
model and optimizer, and the per-process batch size is one of the values a DeepSpeed config may
leave ``"auto"``. Until then the prepared model is a thin module around the user's module.

The Accelerator's accumulation policy owns the accumulation boundary: the engine runs in
DeepSpeed's unmanaged-accumulation mode, ``backward`` leaves the loss as the policy divided it,
and the engine steps exactly when the prepared optimizer's ``step`` runs at a boundary. So N
processes of batch b under ZeRO train like DDP, and like one process of batch N*b.

Checkpoints are each process's ZeRO partitions (optimizer state, fp32 master weights and, for
ZeRO-3, the parameter shards) in safetensors plus JSON, in a ``zero/`` folder; nothing there is
unpickled. Only NVMe-offloaded state, which DeepSpeed alone can read back, is written with
DeepSpeed's own (pickled) checkpoint files in a ``deepspeed/`` folder, and reading those needs
``DeepSpeed(trust_deepspeed_checkpoints=True)``.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from .base import Strategy, check_loaded_keys
from .packages import missing_package_message, package_available, require_package

INSTALL_HINT = "pip install 'trainer-kit[deepspeed]'"
MINIMUM_VERSION = (0, 19, 4)  # the first release whose engine lets the caller own the accumulation boundary
# Keys of a launch configuration's ``deepspeed_config`` section and the argument each one sets here.
CONFIG_KEYS = {
    "zero_stage": "zero_stage", "offload_optimizer_device": "offload_optimizer_device",
    "offload_param_device": "offload_param_device", "offload_optimizer_nvme_path": "offload_optimizer_nvme_path",
    "offload_param_nvme_path": "offload_param_nvme_path", "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "gradient_clipping", "zero3_init_flag": "zero3_init_flag",
    "zero3_save_16bit_model": "zero3_save_16bit_model", "deepspeed_config_file": "config",
}
# Keys that tell a multi-machine launcher where to start processes; a running process has no use for them.
LAUNCHER_ONLY = ("deepspeed_hostfile", "deepspeed_multinode_launcher", "deepspeed_inclusion_filter",
                 "deepspeed_exclusion_filter")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
CHECKPOINT_FORMATS = ("safetensors", "deepspeed")
# ZeRO sizes a config may leave "auto": DeepSpeed's own defaults apply when the model does not say better.
_AUTO_ZERO_SIZES = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                    "allgather_bucket_size", "sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance")
_PARTITIONS_DIR, _NATIVE_DIR = "zero", "deepspeed"
_LOSS_SCALER_KEY = "__loss_scaler__"


def deepspeed_available() -> bool:
    """Whether ``import deepspeed`` can succeed, without importing it (a few seconds and a device probe)."""
    return package_available("deepspeed")


def missing_deepspeed_message(what: str = "The DeepSpeed strategy") -> str:
    return missing_package_message(what, "deepspeed", INSTALL_HINT)


def require_deepspeed(what: str = "The DeepSpeed strategy") -> None:
    """One clear ImportError, before any work, when deepspeed cannot be imported."""
    require_package("deepspeed", what, "deepspeed", INSTALL_HINT)


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError(f"{missing_deepspeed_message()} ({error})") from error
    from packaging.version import Version

    if Version(deepspeed.__version__).release < MINIMUM_VERSION:
        # Older engines ignore the unmanaged-accumulation switch and would step on their own schedule.
        raise ImportError(f"The DeepSpeed strategy needs deepspeed>={'.'.join(map(str, MINIMUM_VERSION))}, found "
                          f"{deepspeed.__version__}. Upgrade it with: {INSTALL_HINT}")
    # The engine calls two torch collectives under their deprecated names on every step; the
    # warnings say nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)
    return deepspeed


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


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


class DeepSpeedModule(nn.Module):
    """What ``prepare`` returns for a model under DeepSpeed: the user's module, run through the engine.

    The engine is built at the first forward; ``parameters()``, ``train()``, ``eval()`` and
    ``state_dict()`` are the user's module's, so code written for the plain model keeps working.
    """

    def __init__(self, module: nn.Module, strategy: DeepSpeed) -> None:
        super().__init__()
        self.module = module
        self.__dict__["_strategy"] = strategy  # not a submodule: the strategy is no part of the model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._strategy.engine(*args, **kwargs)

    def train(self, mode: bool = True) -> DeepSpeedModule:
        super().train(mode)
        engine = self._strategy._engine
        if engine is not None:
            engine.train(mode)
        return self


class _EngineScaledPrecision:
    """The Accelerator's precision policy with loss scaling and the optimizer step left to the engine.

    Autocast and the forward's output casting stay the policy's; the engine scales fp16 losses,
    unscales the gradients and skips overflowing steps itself, so the loss passes through
    unscaled and the step is the engine's. ``optimizer_step`` reports a skipped step, so the
    prepared scheduler does not advance on it.
    """

    scaler = None

    def __init__(self, precision: Any, strategy: DeepSpeed) -> None:
        self._precision = precision
        self._strategy = strategy

    def __getattr__(self, name: str) -> Any:
        if name == "_precision":
            raise AttributeError(name)
        return getattr(self._precision, name)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def optimizer_step(self, optimizer: torch.optim.Optimizer, step: Callable[..., Any], **kwargs: Any) -> bool:
        step(**kwargs)
        return self._strategy.last_step_applied

    def state_dict(self) -> dict[str, Any]:
        return {}  # the engine's loss scale is part of the strategy's checkpoint files

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DeepSpeed(Strategy):
    """Train with a DeepSpeed engine: ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters).

    Args:
        config: a DeepSpeed config (a dict, or the path of a JSON file). ``"auto"`` values are
            filled from the run: the per-process batch size from the prepared data loader,
            ``gradient_accumulation_steps`` from the Accelerator, ``fp16``/``bf16`` from its
            precision, ``gradient_clipping`` from ``accelerator.clip_grad_norm_``.
        zero_stage: 0-3; by default the config's, else 2.
        offload_optimizer_device, offload_param_device: ``"none"``, ``"cpu"`` or ``"nvme"``.
        offload_optimizer_nvme_path, offload_param_nvme_path: where NVMe offload writes.
        gradient_accumulation_steps: must agree with the Accelerator's (checked, never silently used).
        gradient_clipping: max gradient norm, clipped by the engine at every step.
        zero3_init_flag: build models inside ``module_sharded_context()`` already partitioned (ZeRO-3).
        zero3_save_16bit_model: under ZeRO-3, ``save_model`` gathers the training-dtype (16-bit under
            fp16/bf16) weights; otherwise it consolidates the fp32 master weights.
        checkpoint_format: ``"safetensors"`` (each process's partitions, nothing pickled) or
            ``"deepspeed"`` (DeepSpeed's own pickled files; NVMe offload always uses them).
        trust_deepspeed_checkpoints: allow loading DeepSpeed's own pickled checkpoint files, which
            can run code when read: only for checkpoints you wrote yourself.
    """

    name = "deepspeed"

    def __init__(self, config: dict[str, Any] | str | os.PathLike | None = None, zero_stage: int | None = None,
                 offload_optimizer_device: str | None = None, offload_param_device: str | None = None,
                 gradient_clipping: float | None = None, zero3_init_flag: bool = False,
                 zero3_save_16bit_model: bool | None = None, gradient_accumulation_steps: int | None = None,
                 offload_optimizer_nvme_path: str | None = None, offload_param_nvme_path: str | None = None,
                 checkpoint_format: str = "safetensors", trust_deepspeed_checkpoints: bool = False) -> None:
        super().__init__()
        require_deepspeed()
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"DeepSpeed(checkpoint_format={checkpoint_format!r}): use one of {list(CHECKPOINT_FORMATS)}.")
        self.config = _load_config(config)
        self._given = {"zero_stage": zero_stage, "offload_optimizer_device": offload_optimizer_device,
                       "offload_param_device": offload_param_device, "gradient_clipping": gradient_clipping,
                       "gradient_accumulation_steps": gradient_accumulation_steps,
                       "zero3_save_16bit_model": zero3_save_16bit_model}
        self._merge_arguments(offload_optimizer_nvme_path, offload_param_nvme_path)
        self.zero3_init_flag = zero3_init_flag
        self.checkpoint_format = checkpoint_format
        self.trust_deepspeed_checkpoints = trust_deepspeed_checkpoints
        self._engine: Any = None
        self._wrapper: DeepSpeedModule | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._precision: Any = None
        self._accumulation: Any = None
        self._batch_size: int | None = None
        self._clip: float | None = None
        self._pending_backwards = 0
        self.last_step_applied = True
        self._own_process_group = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DeepSpeed:
        """Build from a ``deepspeed_config`` section of a launch configuration (already validated)."""
        kwargs = {}
        for key, value in config.items():
            if key in LAUNCHER_ONLY:
                continue
            if key not in CONFIG_KEYS:
                close = difflib.get_close_matches(key, list(CONFIG_KEYS), n=1)
                raise ValueError(f"Unknown deepspeed_config key {key!r}." + (f" Did you mean {close[0]!r}?" if close else ""))
            kwargs[CONFIG_KEYS[key]] = value
        return cls(**kwargs)

    # -- the configuration -----------------------------------------------------------------------------
    def _merge_arguments(self, optimizer_nvme_path: str | None, param_nvme_path: str | None) -> None:
        """Put the constructor's arguments into the config; a concrete value that disagrees is an error."""
        given = self._given
        zero = self.config.setdefault("zero_optimization", {})
        if given["zero_stage"] is not None:
            if given["zero_stage"] not in (0, 1, 2, 3):
                raise ValueError(f"DeepSpeed(zero_stage={given['zero_stage']!r}): use 0, 1, 2 or 3.")
            _agree(zero, "stage", given["zero_stage"], "zero_stage", "zero_optimization.stage")
        zero.setdefault("stage", 2)
        if _is_auto(zero["stage"]):
            zero["stage"] = 2
        for kind, path in (("optimizer", optimizer_nvme_path), ("param", param_nvme_path)):
            device = given[f"offload_{kind}_device"]
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
        if given["gradient_clipping"] is not None:
            _agree(self.config, "gradient_clipping", float(given["gradient_clipping"]), "gradient_clipping",
                   "gradient_clipping")
        if given["gradient_accumulation_steps"] is not None:
            _agree(self.config, "gradient_accumulation_steps", int(given["gradient_accumulation_steps"]),
                   "gradient_accumulation_steps", "gradient_accumulation_steps")
        if given["zero3_save_16bit_model"] is not None:
            _agree(zero, "stage3_gather_16bit_weights_on_model_save", bool(given["zero3_save_16bit_model"]),
                   "zero3_save_16bit_model", "zero_optimization.stage3_gather_16bit_weights_on_model_save")
        if self.config.get("managed_gradient_accumulation") not in (None, False):
            raise ValueError("The DeepSpeed config sets managed_gradient_accumulation: the Accelerator's accumulation "
                             "policy decides when the optimizer steps; remove the key.")

    @property
    def zero_stage(self) -> int:
        return int(self.config["zero_optimization"]["stage"])

    @property
    def zero3_save_16bit_model(self) -> bool:
        return bool(self.config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False))

    @property
    def _uses_nvme(self) -> bool:
        zero = self.config["zero_optimization"]
        return any((zero.get(f"offload_{kind}") or {}).get("device") == "nvme" for kind in ("optimizer", "param"))

    def _check_accumulation(self, steps: int) -> None:
        configured = self.config.get("gradient_accumulation_steps")
        if configured is not None and not _is_auto(configured) and int(configured) != steps:
            raise ValueError(
                f"The DeepSpeed config says gradient_accumulation_steps={configured}, but the Accelerator accumulates "
                f"{steps} micro-batches per step. Make them agree (Accelerator(gradient_accumulation_steps={configured}) "
                "or Trainer(accumulate=...)), or set the config's value to \"auto\"."
            )

    def _precision_sections(self) -> dict[str, bool]:
        name = getattr(self._precision, "name", "no")
        return {"fp16": name == "fp16", "bf16": name == "bf16"}

    def resolved_config(self) -> dict[str, Any]:
        """The config the engine is built with: every ``"auto"`` filled from the run, every clash an error."""
        config = copy.deepcopy(self.config)
        steps = self._accumulation.steps if self._accumulation is not None else 1
        self._check_accumulation(steps)
        config["gradient_accumulation_steps"] = steps
        micro = config.get("train_micro_batch_size_per_gpu")
        if micro is None or _is_auto(micro):
            micro = self._batch_size or 1  # without a prepared loader it only feeds DeepSpeed's sample counters
        elif self._batch_size is not None and int(micro) != self._batch_size:
            raise ValueError(f"The DeepSpeed config says train_micro_batch_size_per_gpu={micro}, but the prepared data "
                             f"loader gives each process batches of {self._batch_size}. Make them agree, or set it to \"auto\".")
        config["train_micro_batch_size_per_gpu"] = int(micro)
        total = int(micro) * steps * self.num_processes
        if config.get("train_batch_size") not in (None, "auto") and int(config["train_batch_size"]) != total:
            raise ValueError(f"The DeepSpeed config says train_batch_size={config['train_batch_size']}, but this run's "
                             f"global batch is {total} ({micro} per process x {steps} accumulation steps x "
                             f"{self.num_processes} processes). Make them agree, or set it to \"auto\".")
        config["train_batch_size"] = total
        for section, wanted in self._precision_sections().items():
            current = config.get(section, {})
            enabled = current.get("enabled", "auto") if isinstance(current, dict) else current
            if _is_auto(enabled) or (section not in config and not wanted):
                config[section] = {**(current if isinstance(current, dict) else {}), "enabled": wanted}
            elif bool(enabled) != wanted:
                raise ValueError(f"The DeepSpeed config has {section}.enabled={enabled}, but the Accelerator's precision is "
                                 f"{getattr(self._precision, 'name', 'no')!r}. Make them agree, or set it to \"auto\".")
        clip = config.get("gradient_clipping")
        if clip is None or _is_auto(clip):
            config["gradient_clipping"] = float(self._clip or 0.0)
        config["managed_gradient_accumulation"] = False
        config.setdefault("zero_allow_untested_optimizer", True)
        self._fill_optimizer_autos(config)
        zero = config["zero_optimization"]
        for key in _AUTO_ZERO_SIZES:
            if _is_auto(zero.get(key)):
                del zero[key]
        left = _auto_paths(config)
        if left:
            raise ValueError(f"The DeepSpeed config leaves {left} as \"auto\", which the run does not determine: give "
                             "them values.")
        return config

    def _fill_optimizer_autos(self, config: dict[str, Any]) -> None:
        defaults = self._optimizer.defaults if isinstance(self._optimizer, ConfigOptimizer) else {}
        params = (config.get("optimizer") or {}).get("params", {})
        for key, value in list(params.items()):
            if _is_auto(value) and key in defaults:
                params[key] = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
        scheduler = (config.get("scheduler") or {}).get("params", {})
        lr = params.get("lr", defaults.get("lr"))
        if _is_auto(scheduler.get("warmup_max_lr")) and lr is not None and not _is_auto(lr):
            scheduler["warmup_max_lr"] = lr
        if _is_auto(scheduler.get("warmup_min_lr")):
            scheduler["warmup_min_lr"] = 0.0

    # -- environment and the run's policies ---------------------------------------------------------------
    def setup_environment(self, device: torch.device, process_index: int = 0, num_processes: int = 1) -> None:
        if device.type == "cpu":
            # DeepSpeed picks its device backend when first imported; a CPU run must not probe for a GPU.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().setup_environment(device, process_index, num_processes)

    def setup_policies(self, precision: Any, accumulation: Any) -> Any:
        if getattr(accumulation, "normalize", "mean") != "mean":
            raise ValueError("Token-normalised accumulation divides the gradients at the boundary, which the DeepSpeed "
                             "engine owns: use accumulation_normalize='mean' with this strategy.")
        self._check_accumulation(accumulation.steps)
        self._precision, self._accumulation = precision, accumulation
        return _EngineScaledPrecision(precision, self)

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
        deepspeed = _import_deepspeed()
        self._ensure_process_group()
        # The engine reads its device from LOCAL_RANK, which torchrun sets; other launches (one process,
        # SLURM tasks) may not have it.
        os.environ.setdefault("LOCAL_RANK", str(self.root_device.index or 0))
        config = self.resolved_config()
        module, optimizer = self._wrapper.module, self._optimizer
        kwargs: dict[str, Any] = {"model": module, "config": config, "dist_init_required": False}
        if isinstance(optimizer, ConfigOptimizer) or optimizer is None:
            kwargs["model_parameters"] = [p for p in module.parameters() if p.requires_grad]
        else:
            kwargs["optimizer"] = optimizer
        engine, _, _, _ = deepspeed.initialize(**kwargs)
        if isinstance(optimizer, ConfigOptimizer):
            # The placeholder shows the real optimizer's groups and state (a scheduler made on it drives them).
            real = getattr(engine.optimizer, "optimizer", engine.optimizer)
            optimizer.param_groups, optimizer.state = real.param_groups, real.state
        self._engine = engine
        if self._clip:
            self._set_engine_clip(self._clip)

    def _ensure_process_group(self) -> None:
        """DeepSpeed needs a process group, even for one process; create (and later close) one when none exists."""
        if dist.is_available() and dist.is_initialized():
            return
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        backend = "gloo" if self.root_device.type == "cpu" else dist.get_default_backend_for_device(self.root_device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        self._own_process_group = True

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
        configured = self.config.get("gradient_clipping")
        if configured is not None and not _is_auto(configured) and float(configured) != float(max_norm):
            raise ValueError(f"The DeepSpeed config clips gradients to {configured}, and clip_grad_norm_ asks for "
                             f"{max_norm}. Make them agree, or set the config's gradient_clipping to \"auto\".")
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
        deepspeed = _import_deepspeed()
        self._ensure_process_group()
        init_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": copy.deepcopy(self.config["zero_optimization"]),
                       **{section: {"enabled": on} for section, on in self._precision_sections().items()}}
        for key in _AUTO_ZERO_SIZES:
            if _is_auto(init_config["zero_optimization"].get(key)):
                del init_config["zero_optimization"][key]
        with deepspeed.zero.Init(config_dict_or_path=init_config):
            yield

    # -- optimizer state dicts: partitioned, so only the strategy's checkpoint files hold them ---------------
    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        raise RuntimeError("Under DeepSpeed each process holds only its partition of the optimizer state: save it with "
                           "accelerator.save_state(), which writes every partition.")

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        raise RuntimeError("Under DeepSpeed the optimizer state is partitioned: restore it with accelerator.load_state().")

    # -- full weights --------------------------------------------------------------------------------------------
    def _full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Every process calls this (ZeRO-3 gathers); the full weights on CPU, tied ones under one name."""
        inner = self.unwrap_module(module)
        if not isinstance(module, DeepSpeedModule):
            return {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
        self.engine  # noqa: B018 - built here if the model has not run yet: the weights live in it
        deepspeed = _import_deepspeed()
        from deepspeed.utils import safe_get_full_fp32_param

        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        entries = inner.state_dict(keep_vars=True)
        if self.zero_stage == 3 and not self.zero3_save_16bit_model:
            # The fp32 master weights, assembled from every process's partition (a collective per parameter).
            for name, tensor in entries.items():
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                full = safe_get_full_fp32_param(tensor) if isinstance(tensor, nn.Parameter) else None
                state[name] = (full if full is not None else tensor).detach().cpu().clone().contiguous()
            return state
        parameters = [p for p in inner.parameters()]
        gather = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None) if self.zero_stage == 3 else nullcontext()
        with gather:
            for name, tensor in entries.items():
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    state[name] = tensor.detach().cpu().clone().contiguous()
        return state

    def save_module(self, module: nn.Module, path: Path) -> None:
        """Rank 0 writes the full weights as one safetensors file that loads into the plain model.

        Under ZeRO-3 the weights are gathered from every process: the training-dtype weights with
        ``zero3_save_16bit_model``, the consolidated fp32 master weights otherwise.
        """
        state = self._full_state(module)
        if self.process_index == 0:
            save_file(state, str(path), metadata={"format": "pt"})

    def load_module(self, module: nn.Module, path: Path, strict: bool = True) -> None:
        """Load full weights into the (partitioned) model on every process; the fp32 master weights follow."""
        if not isinstance(module, DeepSpeedModule):
            super().load_module(module, path, strict)
            return
        deepspeed = _import_deepspeed()
        engine = self.engine
        inner = module.module
        loaded = load_file(str(path))
        entries = inner.state_dict(keep_vars=True)
        missing = sorted(set(entries) - set(loaded) - _tied_aliases(entries, loaded))
        unexpected = sorted(set(loaded) - set(entries))
        check_loaded_keys(path, missing, unexpected, strict)
        parameters = list(inner.parameters())
        gather = deepspeed.zero.GatheredParameters(parameters, modifier_rank=0) if self.zero_stage == 3 else nullcontext()
        with gather, torch.no_grad():
            for name, tensor in entries.items():
                if name in loaded:
                    tensor.copy_(loaded[name].to(tensor.dtype))
        if hasattr(engine.optimizer, "refresh_fp32_params"):
            engine.optimizer.refresh_fp32_params()

    # -- checkpoints: each process's partitions ------------------------------------------------------------------
    def save_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        if self._wrapper is None or not any(m is self._wrapper for m in modules):
            return False
        if self._pending_backwards:
            raise RuntimeError("The DeepSpeed engine holds partial gradient sums between optimizer steps, which its "
                               "checkpoint does not include: save at an accumulation boundary (after optimizer.step()).")
        engine = self.engine
        if self.checkpoint_format == "deepspeed" or self._uses_nvme:
            engine.save_checkpoint(str(directory / _NATIVE_DIR), tag="state", save_latest=False)
            self._save_extra_modules(modules, directory)
            return True
        from .state_format import save_state_files, write_json

        folder = directory / _PARTITIONS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        optimizer = engine.optimizer
        self._checkpoint_event(optimizer, "prologue")
        try:
            state: dict[str, Any] = {"engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                                                "skipped_steps": engine.skipped_steps}}
            if hasattr(optimizer, "state_dict") and not isinstance(optimizer, ConfigOptimizer):
                state["optimizer"] = _plain_optimizer_state(optimizer.state_dict())
            if engine.lr_scheduler is not None and hasattr(engine.lr_scheduler, "state_dict"):
                state["lr_scheduler"] = engine.lr_scheduler.state_dict()
            state["model"] = self._local_model_partition()
            save_state_files(state, folder, f"rank_{self.process_index}")
        finally:
            self._checkpoint_event(optimizer, "epilogue")
        if self.process_index == 0:
            import deepspeed

            write_json(folder / "meta.json", {"zero_stage": self.zero_stage, "num_processes": self.num_processes,
                                              "deepspeed_version": deepspeed.__version__,
                                              "parameters": {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                                                             for n, p in self._wrapper.module.named_parameters()}})
        self._save_extra_modules(modules, directory)
        return True

    def _save_extra_modules(self, modules: list[nn.Module], directory: Path) -> None:
        """Models without an engine (frozen ones) are saved as the generic checkpoint would."""
        for index, module in enumerate(modules):
            if module is not self._wrapper:
                super().save_module(module, directory / f"{'model' if index == 0 else f'model_{index}'}.safetensors")

    def _local_model_partition(self) -> dict[str, torch.Tensor]:
        """ZeRO-3: this process's shard of every parameter; ZeRO-0/1/2: the full weights, on rank 0 only."""
        inner = self._wrapper.module
        if self.zero_stage == 3:
            return {name: p.ds_tensor.detach() for name, p in inner.named_parameters() if hasattr(p, "ds_tensor")}
        if self.process_index != 0:
            return {}
        return {name: p.detach() for name, p in inner.named_parameters()}

    def load_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        if self._wrapper is None or not any(m is self._wrapper for m in modules):
            return False
        native, partitions = directory / _NATIVE_DIR, directory / _PARTITIONS_DIR
        if native.is_dir():
            self._load_native(native)
        elif partitions.is_dir():
            self._load_partitions(partitions)
        else:
            return False
        for index, module in enumerate(modules):
            if module is not self._wrapper:
                super().load_module(module, directory / f"{'model' if index == 0 else f'model_{index}'}.safetensors")
        self._pending_backwards = 0
        return True

    def _load_native(self, folder: Path) -> None:
        if not self.trust_deepspeed_checkpoints:
            raise ValueError(
                f"{folder} holds DeepSpeed's own checkpoint files, which are Python pickles: reading one can run code. "
                "Load them only if you wrote them yourself, with DeepSpeed(trust_deepspeed_checkpoints=True)."
            )
        loaded, _ = self.engine.load_checkpoint(str(folder), tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}.")

    def _load_partitions(self, folder: Path) -> None:
        from .state_format import load_state_files, read_json

        meta = read_json(folder / "meta.json")
        if meta["num_processes"] != self.num_processes or meta["zero_stage"] != self.zero_stage:
            raise ValueError(
                f"{folder.parent} holds ZeRO-{meta['zero_stage']} partitions of {meta['num_processes']} process(es); this "
                f"run is ZeRO-{self.zero_stage} on {self.num_processes}. Resume with the same layout, or start a new run "
                "from full weights written by accelerator.save_model()."
            )
        engine = self.engine
        state = load_state_files(folder, f"rank_{self.process_index}", device="cpu")
        self._load_model_partition(folder, state.get("model", {}))
        optimizer = engine.optimizer
        if "optimizer" in state:
            self._checkpoint_event(optimizer, "prologue")
            restored = _restore_optimizer_state(state["optimizer"], optimizer)
            everyone = [restored] * self.num_processes  # indexed by rank: this process reads its own entry
            if self.zero_stage == 3:
                optimizer.load_state_dict(everyone, load_optimizer_states=True)
            else:
                optimizer.load_state_dict(everyone, load_optimizer_states=True, load_from_fp32_weights=True)
                optimizer.update_lp_params()  # the model's weights from the fp32 master weights
            self._checkpoint_event(optimizer, "epilogue")
        if "lr_scheduler" in state and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        counters = state.get("engine", {})
        engine.global_steps = int(counters.get("global_steps", engine.global_steps))
        engine.global_samples = int(counters.get("global_samples", engine.global_samples))
        engine.skipped_steps = int(counters.get("skipped_steps", engine.skipped_steps))

    def _load_model_partition(self, folder: Path, saved: dict[str, torch.Tensor]) -> None:
        inner = self._wrapper.module
        with torch.no_grad():
            if self.zero_stage == 3:
                for name, p in inner.named_parameters():
                    if name in saved:
                        p.ds_tensor.copy_(saved[name])
                return
            if self.process_index == 0:
                for name, p in inner.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])
            for p in inner.parameters():  # every process starts from rank 0's weights
                dist.broadcast(p.data, src=0)

    @staticmethod
    def _checkpoint_event(optimizer: Any, which: str) -> None:
        hook = getattr(optimizer, f"checkpoint_event_{which}", None)
        if hook is not None:
            hook()

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
        self._wrapper, self._optimizer = None, None
        import gc

        gc.collect()
        if self._own_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_process_group = False


# -- helpers --------------------------------------------------------------------------------------------------------
def _load_config(config: dict[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
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
    if current is None or _is_auto(current) or current == value:
        section[key] = value
        return
    raise ValueError(f"DeepSpeed({argument}={value!r}) disagrees with the DeepSpeed config's {where}={current!r}: "
                     "give one of them, or make them agree.")


def _auto_paths(config: Any, prefix: str = "") -> list[str]:
    if isinstance(config, dict):
        return [path for key, value in config.items() for path in _auto_paths(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if _is_auto(config) else []


def _tied_aliases(entries: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> set[str]:
    """Names of tensors that share storage with a loaded name (tied weights are written once)."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in entries.items():
        by_id.setdefault(id(tensor), []).append(name)
    return {name for names in by_id.values() if any(n in loaded for n in names) for name in names}


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _plain_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """The ZeRO optimizer's state dict with nothing that needs pickling: tensors, numbers, strings, lists, dicts.

    The loss scaler object becomes its numbers; the parameter slice mappings (rebuilt from the
    model on load) are left out.
    """
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if key == "param_slice_mappings":
            continue
        if hasattr(value, "cur_scale"):
            plain[key] = {_LOSS_SCALER_KEY: {k: v for k, v in vars(value).items() if _scalar(v)}}
        elif isinstance(value, int) and not isinstance(value, bool):
            plain[key] = int(value)  # ZeRO's stage enum as a number
        else:
            plain[key] = value
    return plain


def _restore_optimizer_state(plain: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    restored = dict(plain)
    for key, value in plain.items():
        if isinstance(value, dict) and _LOSS_SCALER_KEY in value:
            scaler = optimizer.loss_scaler
            for name, number in value[_LOSS_SCALER_KEY].items():
                setattr(scaler, name, number)
            restored[key] = scaler
    if hasattr(optimizer, "_param_slice_mappings"):
        restored["param_slice_mappings"] = optimizer._param_slice_mappings
    return restored
