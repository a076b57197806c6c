"""The Strategy interface: where the model lives and how processes stay in step.

The Accelerator and the Trainer talk to a Strategy only through the methods below, so their
loops never name a backend. A strategy decides how a module and an optimizer are wrapped
(DDP, FSDP, a DeepSpeed engine...), how backward and the optimizer step run, whether a
micro-step may skip gradient synchronisation, how tensors move between processes, and how a
model and an optimizer are written to and read from a checkpoint.

Strategies never import ``trainer``: they receive the device and the rank layout in
``setup_environment``.
"""

from __future__ import annotations

import functools
import inspect
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch import nn

from .policies import AccumulationPolicy, PrecisionPolicy
from .spec import StrategySpec

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


S = TypeVar("S", bound="Strategy")


class Strategy:
    """Base class: one process, one device, nothing wrapped. Subclasses override what differs.

    A subclass describes itself in ``spec`` (a ``StrategySpec``: its names, its launch-configuration
    section and options, the package it needs) and is made known with ``register_strategy``.
    """

    spec: ClassVar[StrategySpec]
    name: ClassVar[str] = "base"  # the spec's name, set for each subclass that has a spec

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if isinstance(spec, StrategySpec):
            cls.name = spec.name

    @classmethod
    def from_config(cls: type[S], section: Mapping[str, Any]) -> S:
        """Build from the strategy's section of a launch configuration (``fsdp_config``...).

        Each key sets the constructor argument its ``Option`` names; keys accepted without effect
        are dropped; an unknown key is one ValueError with a did-you-mean.
        """
        return cls(**cls.spec.arguments(section))

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """What each option of the spec is when its key is absent: the constructor's default for its argument."""
        parameters = inspect.signature(cls).parameters
        defaults = {name: parameter.default for name, parameter in parameters.items()
                    if parameter.default is not inspect.Parameter.empty}
        return {option.key: defaults[option.argument] for option in cls.spec.options if option.argument in defaults}

    def __init__(self) -> None:
        self._device: torch.device | None = None
        self.process_index = 0
        self.num_processes = 1
        self._own_process_group = False

    # -- environment ---------------------------------------------------------------------------
    def setup_environment(self, device: torch.device, process_index: int = 0, num_processes: int = 1) -> None:
        """Learn where this process runs: called once by the Accelerator, before anything is prepared.

        ``device`` is the one PartialState picked, ``process_index`` and ``num_processes`` the job's
        layout. A strategy that cannot run on this layout raises here, before any work.
        """
        self._device = device
        self.process_index = process_index
        self.num_processes = num_processes

    @property
    def root_device(self) -> torch.device:
        """The device this process computes on (after ``setup_environment``)."""
        if self._device is None:
            raise RuntimeError(f"{type(self).__name__}.setup_environment() has not been called yet.")
        return self._device

    @property
    def distributed_type(self) -> str:
        """The launch configuration's name for how this run is distributed (``accelerator.distributed_type``).

        By default the first of the spec's ``distributed_types`` (the strategy's name when it has none);
        a strategy whose name depends on the device (DDP: ``MULTI_CPU``, ``MULTI_GPU``...) says so here.
        """
        spec = getattr(type(self), "spec", None)  # the base class itself has none
        return spec.distributed_types[0] if spec is not None and spec.distributed_types else self.name

    @property
    def is_distributed(self) -> bool:
        """Whether the job runs more than one process."""
        return self.num_processes > 1

    @property
    def parallelism_config(self) -> Any:
        """The N-D layout (a ``ParallelismConfig``) the strategy trains with, or None (``accelerator.parallelism_config``)."""
        return None

    @property
    def device_mesh(self) -> Any:
        """The ``DeviceMesh`` the processes are laid out on, or None for a strategy without one
        (``accelerator.torch_device_mesh``). Asked on every process: building it is a collective."""
        return None

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        """How a sampler shards data for this strategy (``num_replicas``/``rank``), or None."""
        if not self.is_distributed:
            return None
        return {"num_replicas": self.num_processes, "rank": self.process_index}

    def setup_policies(self, precision: PrecisionPolicy, accumulation: AccumulationPolicy) -> PrecisionPolicy:
        """Meet the run's precision and accumulation policies; return the precision policy to train with.

        Called once by the Accelerator, after ``setup_environment``. A strategy that builds its own
        engine reads what its configuration leaves open (accumulation steps, fp16/bf16) from them,
        and one whose engine scales fp16 losses itself returns a policy that leaves that to it.
        The default returns ``precision`` unchanged.
        """
        return precision

    def observe_batch_size(self, batch_size: int | None) -> None:
        """Learn the per-process batch size: called for each data loader the Accelerator prepares for training.

        Strategies whose engine needs it (DeepSpeed's ``train_micro_batch_size_per_gpu``) keep it;
        the default ignores it.
        """

    def teardown(self) -> None:
        """Release what the strategy built (an engine, its hooks, a group it opened).

        Called by ``Accelerator.end_training`` while the process group still exists.
        """

    def ensure_process_group(self) -> None:
        """Open a one-process group when none exists, for backends that need one even for a single process.

        ``release_process_group`` (from ``teardown``) closes it again; a group someone else opened is left alone.
        """
        if dist.is_available() and dist.is_initialized():
            return
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        backend = "gloo" if self.root_device.type == "cpu" else dist.get_default_backend_for_device(self.root_device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        self._own_process_group = True

    def release_process_group(self) -> None:
        """Close the group ``ensure_process_group`` opened, if it did."""
        if self._own_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self._own_process_group = False

    # -- model and optimizer -------------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Place and wrap a model: called by ``prepare`` for each model; return what the training loop calls.

        Called after the precision policy converted the model, on every process with the same model.
        """
        return module.to(self.root_device)

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Adapt an optimizer to the prepared models (called by ``prepare``, after the models); return it."""
        return optimizer

    def setup_scheduler(self, scheduler: Any, split_batches: bool = False) -> Any:
        """Adapt an LR scheduler (called by ``prepare``, after the optimizers); return it.

        ``split_batches`` says whether the loaders' batches are global (cut among the processes).
        Strategies whose engine steps the scheduler itself (DeepSpeed's config section) check it here.
        """
        return scheduler

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        """Return the user's module inside whatever wrapper ``setup_module`` added (``unwrap_model``, checkpoints)."""
        return module

    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> AbstractContextManager[Any]:
        """Return a context in which backward does not synchronise gradients.

        Entered around accumulation micro-steps that do not end a group (``accumulate``, ``no_sync``).
        """
        return nullcontext()

    def force_backward_sync(self, module: nn.Module) -> AbstractContextManager[Any]:
        """Return a context in which backward synchronises gradients even inside ``no_backward_sync``.

        Entered by ``accelerator.trigger_sync_in_backward``; strategies that synchronise in backward
        (DDP) arm it, the others have nothing to do.
        """
        return nullcontext()

    def join(self, modules: list[nn.Module]) -> AbstractContextManager[Any]:
        """Return a context for loops whose processes may run different numbers of batches (``join_uneven_inputs``)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor, module: nn.Module | None = None, **kwargs: Any) -> None:
        """Run backward from ``loss`` (already divided for accumulation and scaled by the precision policy).

        Called by ``accelerator.backward``; ``module`` is the one prepared model, when there is one.
        """
        loss.backward(**kwargs)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        """Step ``optimizer`` at an accumulation boundary; return what its ``step`` returns."""
        return optimizer.step(**kwargs)

    def step_function(self, optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
        """What steps ``optimizer`` under this strategy, built once (the training loop calls it every step).

        Strategies that keep the plain ``optimizer_step`` get the optimizer's own ``step``: no layer
        of ours between the loop and the optimizer.
        """
        if type(self).optimizer_step is Strategy.optimizer_step:
            return optimizer.step
        return functools.partial(self.optimizer_step, optimizer)

    def gradients_present(self, optimizer: torch.optim.Optimizer) -> bool | None:
        """Called at each optimizer step: whether any parameter of ``optimizer`` holds a gradient.

        Return None where an engine keeps the gradients away from the parameters (the check that
        a step has gradients to apply is then left out).
        """
        for group in optimizer.param_groups:  # loops, not any(<generator>): this runs at every step
            for parameter in group["params"]:
                if parameter.grad is not None:
                    return True
        return False

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float,
                        norm_type: float = 2.0) -> torch.Tensor | None:
        """Clip the total gradient norm to ``max_norm``; return the norm before clipping (None where it is not known yet).

        Called at accumulation boundaries, with the gradients final and unscaled.
        """
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)

    def clip_grad_value_(self, parameters: Iterable[torch.Tensor], clip_value: float) -> None:
        """Clamp every gradient to ``[-clip_value, clip_value]`` (at accumulation boundaries)."""
        torch.nn.utils.clip_grad_value_(parameters, clip_value)

    # -- collectives (identity on one process) -------------------------------------------------
    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.is_distributed:
            dist.barrier()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's tensor along dim 0 (0-d tensors become one row each)."""
        if not self.is_distributed:
            return tensor if tensor.dim() else tensor.unsqueeze(0)
        tensor = tensor.contiguous() if tensor.dim() else tensor.reshape(1)
        parts = [torch.empty_like(tensor) for _ in range(self.num_processes)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce across processes into a new tensor; ``op`` is sum, mean, max or min."""
        result = tensor.clone()
        if op == "mean" and not (result.is_floating_point() or result.is_complex()):
            # A mean of integers is fractional: the result is float on any number of processes.
            result = result.to(torch.get_default_dtype())
        if not self.is_distributed:
            return result
        dist.all_reduce(result, op=_REDUCE_OPS["sum" if op == "mean" else op])
        if op == "mean":
            result /= self.num_processes
        return result

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Process ``src``'s ``tensor`` on every process, written into ``tensor`` (returned)."""
        if self.is_distributed:
            dist.broadcast(tensor, src=src)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Return every process's ``obj`` (picklable), in process order."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.num_processes
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Return process ``src``'s ``obj`` (picklable) on every process."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    # -- checkpoint IO ----------------------------------------------------------------------------
    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Return the module's whole weights by name, for ``accelerator.get_state_dict``.

        Called on every process; a strategy that shards the weights gathers them (process 0 then
        holds them, on the CPU). The default is the unwrapped module's own ``state_dict()``.
        """
        return self.unwrap_module(module).state_dict()

    def save_module(self, module: nn.Module, path: Path) -> None:
        """Write the module's full weights as one safetensors file at ``path`` (tied weights stored once).

        Called on every process (``save_model``, checkpoints); process 0 writes.
        """
        if self.process_index == 0:
            save_model(self.unwrap_module(module), str(path))

    def load_module(self, module: nn.Module, path: Path, strict: bool = True) -> None:
        """Load the weights ``save_module`` wrote into the prepared module, on every process.

        With ``strict``, keys missing or in excess are one error naming them.
        """
        missing, unexpected = load_model(self.unwrap_module(module), str(path), strict=False,
                                         device=str(self.root_device))
        check_loaded_keys(path, missing, unexpected, strict)

    def save_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        """Write the models' and optimizers' state in this strategy's own (e.g. sharded) format.

        Called on every process with the checkpoint's scratch directory. Return True when done,
        so the generic per-model safetensors and per-optimizer files are not written; the
        default writes nothing and returns False.
        """
        return False

    def save_training_state_async(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                                  directory: Path, process_group: Any) -> Future[Any] | None:
        """For an asynchronous save: start writing what ``save_training_state`` writes, in the background.

        Called on every process, on the training thread, with the scratch directory and a process
        group (gloo) kept for checkpoint writes. Copy what the write needs before returning, and
        return a future that completes once the files are written; return None (the default) to
        have ``save_training_state`` called instead, synchronously.
        """
        return None

    def load_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        """Read what ``save_training_state`` wrote; return False when ``directory`` holds none of it."""
        return False

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Return the optimizer's whole state, as the generic checkpoint stores it."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Restore what ``optimizer_state_dict`` returned."""
        optimizer.load_state_dict(state)

    @contextmanager
    def module_sharded_context(self) -> Iterator[None]:
        """Context in which the user builds a model that this strategy shards as it is created (nothing by default)."""
        yield


def check_loaded_keys(path: Path, missing: Iterable[str], unexpected: Iterable[str], strict: bool) -> None:
    """With ``strict``, one error naming the keys a loaded checkpoint lacked or had in excess."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"The checkpoint {path} does not match the model: missing keys {missing}, "
            f"unexpected keys {unexpected}. Load it into the model it was saved from, or "
            "pass strict=False to load what matches."
        )
