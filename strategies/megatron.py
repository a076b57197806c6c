"""Megatron: tensor parallelism with megatron-core's layers behind the Strategy interface.

The processes form a grid: ``tp_degree`` processes share each layer (every one holds a slice of
its weights: megatron-core's ``ColumnParallelLinear``/``RowParallelLinear`` split them and talk
inside their forward and backward), and the rest of the processes are data-parallel replicas of
that group. So this strategy does for the data-parallel dimension what DDP does, and nothing
for the tensor-parallel one, whose gradients the layers already make right on every rank:

- data is sharded over the data-parallel group only (the processes of one tensor-parallel
  group must see the same batch);
- gradients are averaged over the data-parallel group only (``DistributedDataParallel`` on
  that group);
- the gradient norm for clipping is the whole model's: every slice of a split weight counted
  once, and every weight that each tensor-parallel rank holds whole counted once too;
- a checkpoint holds each tensor-parallel rank's slices as safetensors plus JSON, written by the
  first data-parallel replica; ``save_model`` gathers the slices into full weights.

The user's model is built with megatron-core's layers and the config that
``model_parallel_config()`` returns, after the Accelerator (which calls ``setup_environment``)
exists: the layers read the tensor-parallel group when they are created.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from .base import Strategy, check_loaded_keys
from .spec import Option, Package, StrategySpec

PACKAGE = Package("megatron.core", "megatron-core", "pip install 'trainer-kit[megatron]'")
_STATE_DIR = "megatron"


def _parallel_state() -> Any:
    try:
        with warnings.catch_warnings():
            # Without Transformer Engine or Apex megatron-core says so at import; it uses its own fallbacks.
            warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
            warnings.filterwarnings("ignore", message=".*Apex.*")
            from megatron.core import parallel_state
    except ImportError as error:
        raise ImportError(f"{PACKAGE.missing_message('The Megatron strategy')} ({error})") from error
    return parallel_state


def _is_split(parameter: torch.Tensor) -> bool:
    """Whether each tensor-parallel rank holds only a slice of this parameter (megatron-core marks those)."""
    return bool(getattr(parameter, "tensor_model_parallel", False))


def _split_dim(parameter: torch.Tensor) -> int:
    """The dimension along which megatron-core split a parameter over the tensor-parallel group."""
    return int(parameter.partition_dim)  # type: ignore[attr-defined]  # set by megatron-core on its split weights


def _mark_split_parameters(module: nn.Module) -> None:
    """Mark the slices of megatron-core's parallel linears that the layers left unmarked.

    Built with ``perform_initialization=False`` on CPU, their weights carry no
    ``tensor_model_parallel`` mark, and clipping and checkpoints would count them as whole.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        set_tensor_model_parallel_attributes,
    )

    for layer in module.modules():
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            column = isinstance(layer, ColumnParallelLinear)
            splits = [(layer.weight, 0 if column else 1)] + ([(layer.bias, 0)] if column and layer.bias is not None else [])
            for p, dim in splits:
                if p is not None and not _is_split(p):
                    set_tensor_model_parallel_attributes(p, True, dim, 1)


class _Recompute(nn.Module):
    """Runs the user's module under activation checkpointing: activations are recomputed in backward.

    The recomputation repeats the forward's tensor-parallel communication, which every rank does
    in the same order, so it stays in step.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.module, *args, use_reentrant=False, **kwargs)


class Megatron(Strategy):
    """Tensor-parallel training with megatron-core layers; data parallel over the remaining processes.

    Args:
        tp_degree: processes that split each layer; must divide the number of processes.
        pp_degree: pipeline stages. Only 1: this strategy runs the Accelerator's loop (one forward
            and backward per micro-batch), not megatron-core's pipeline schedules.
        num_micro_batches: micro-batches per optimizer step. Without a pipeline they are the
            Accelerator's gradient accumulation steps, and must agree with them.
        sequence_parallelism: the model's layers split activations along the sequence too (build it
            with ``model_parallel_config()``); gradients of the weights each rank holds whole are then
            summed over the tensor-parallel group before the step.
        recompute_activations: recompute the model's activations in backward instead of keeping them.
        use_distributed_optimizer: megatron-core's distributed optimizer (not supported here).
        gradient_clipping: clip the whole model's gradient norm to this at every optimizer step.
    """

    spec = StrategySpec(
        name="megatron", summary="tensor parallelism with megatron-core's layers, data parallel over the other processes",
        distributed_types=("MEGATRON_LM",), section="megatron_lm_config", package=PACKAGE,
        launch_flag="use_megatron_lm",
        options=(
            Option("megatron_lm_tp_degree", "tp_degree", (int,), "Tensor-parallel degree: processes that split each layer.",
                   minimum=1, question="Tensor-parallel degree?"),
            Option("megatron_lm_pp_degree", "pp_degree", (int,), "Pipeline-parallel degree (only 1).", minimum=1),
            Option("megatron_lm_num_micro_batches", "num_micro_batches", (int,),
                   "Micro-batches per step; without a pipeline, the gradient accumulation steps.", minimum=1),
            Option("megatron_lm_sequence_parallelism", "sequence_parallelism", (bool,),
                   "Shard activations along the sequence dimension."),
            Option("megatron_lm_recompute_activations", "recompute_activations", (bool,),
                   "Recompute activations during backward."),
            Option("megatron_lm_use_distributed_optimizer", "use_distributed_optimizer", (bool,),
                   "Shard the optimizer state over data-parallel ranks (not supported)."),
            Option("megatron_lm_gradient_clipping", "gradient_clipping", (int, float), "Maximum gradient norm."),
        ))

    def __init__(self, tp_degree: int = 1, pp_degree: int = 1, num_micro_batches: int = 1,
                 sequence_parallelism: bool = False, recompute_activations: bool = False,
                 use_distributed_optimizer: bool = False, gradient_clipping: float | None = None) -> None:
        super().__init__()
        PACKAGE.require("The Megatron strategy")
        for argument, value in (("tp_degree", tp_degree), ("pp_degree", pp_degree), ("num_micro_batches", num_micro_batches)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Megatron({argument}={value!r}): use a whole number >= 1.")
        if pp_degree != 1:
            raise ValueError(f"Megatron(pp_degree={pp_degree}): pipeline parallelism is not supported by this strategy, "
                             "which runs the Accelerator's training loop (one forward and backward per micro-batch) rather "
                             "than megatron-core's pipeline schedules. Use pp_degree=1 and split the model with tp_degree.")
        if use_distributed_optimizer:
            raise ValueError("Megatron(use_distributed_optimizer=True) is not supported: megatron-core's distributed "
                             "optimizer needs its own DistributedDataParallel and CUDA buffers. Leave it False (every "
                             "data-parallel replica keeps the optimizer state of its tensor-parallel slice).")
        if gradient_clipping is not None and not (gradient_clipping > 0):
            raise ValueError(f"Megatron(gradient_clipping={gradient_clipping!r}): use a positive max norm, or None.")
        self.tp_degree, self.pp_degree, self.num_micro_batches = tp_degree, pp_degree, num_micro_batches
        self.sequence_parallelism, self.recompute_activations = bool(sequence_parallelism), bool(recompute_activations)
        self.use_distributed_optimizer = False
        self.gradient_clipping = None if gradient_clipping is None else float(gradient_clipping)
        self.tp_rank, self.dp_rank, self.dp_size = 0, 0, 1
        self._tp_group: Any = None
        self._dp_group: Any = None
        self._initialized = False
        self._modules: list[nn.Module] = []
        self._grads_finished = False

    # -- environment -----------------------------------------------------------------------------------------------
    def setup_environment(self, device: torch.device, process_index: int = 0, num_processes: int = 1) -> None:
        """Lay the processes out as tensor-parallel groups times data-parallel replicas, in megatron-core's state."""
        super().setup_environment(device, process_index, num_processes)
        model_parallel = self.tp_degree * self.pp_degree
        if num_processes % model_parallel:
            raise ValueError(f"Megatron(tp_degree={self.tp_degree}, pp_degree={self.pp_degree}) needs a number of processes "
                             f"divisible by {model_parallel}; this job runs {num_processes}.")
        parallel_state = _parallel_state()
        self.ensure_process_group()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()  # a previous Accelerator's layout in this process
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.tp_degree,
                                                 pipeline_model_parallel_size=self.pp_degree)
        self._initialized = True
        self._tp_group = parallel_state.get_tensor_model_parallel_group()
        self._dp_group = parallel_state.get_data_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()

    def model_parallel_config(self, **overrides: Any) -> Any:
        """The megatron-core ``ModelParallelConfig`` to build the model's layers with, matching this layout.

        On CPU the layers initialise their weights on the CPU (``use_cpu_initialization``): the
        full weight is drawn from the same seed on every rank and each rank keeps its slice.
        """
        _parallel_state()
        from megatron.core.model_parallel_config import ModelParallelConfig

        settings = {"tensor_model_parallel_size": self.tp_degree, "pipeline_model_parallel_size": self.pp_degree,
                    "sequence_parallel": self.sequence_parallelism and self.tp_degree > 1,
                    "use_cpu_initialization": self.root_device.type == "cpu", "params_dtype": torch.float32}
        settings.update(overrides)
        return ModelParallelConfig(**settings)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        """Shard data over the data-parallel replicas: the ranks of one tensor-parallel group read the same batches."""
        if not self.is_distributed:
            return None
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    def setup_policies(self, precision: Any, accumulation: Any) -> Any:
        steps = getattr(accumulation, "steps", 1)
        if self.num_micro_batches > 1 and steps != self.num_micro_batches:
            raise ValueError(f"Megatron(num_micro_batches={self.num_micro_batches}) means gradient accumulation without a "
                             f"pipeline, but the Accelerator accumulates {steps} micro-batch(es) per step. Make them agree "
                             f"(Accelerator(gradient_accumulation_steps={self.num_micro_batches})), or leave it at 1.")
        if getattr(precision, "scaler", None) is not None and (self.gradient_clipping or self.sequence_parallelism):
            # The loss scaler steps the optimizer itself, past the strategy's step, where clipping and the
            # sequence-parallel gradient sums happen.
            raise ValueError("Megatron(gradient_clipping=..., sequence_parallelism=True) need the strategy's optimizer "
                             "step, which fp16 loss scaling bypasses: use bf16 or fp32, or clip with "
                             "accelerator.clip_grad_norm_ and leave sequence_parallelism off.")
        return precision

    def teardown(self) -> None:
        """Destroy megatron-core's groups while the process group that holds them is still up."""
        self._modules = []
        if self._initialized:
            parallel_state = _parallel_state()
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            self._initialized = False
        self._tp_group = self._dp_group = None
        self.release_process_group()

    # -- model and optimizer ----------------------------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        if not self._initialized:
            raise RuntimeError("Megatron.setup_environment() has not been called yet.")
        module = module.to(self.root_device)
        _mark_split_parameters(module)
        if not any(p.requires_grad for p in module.parameters()):
            return module  # a frozen model has no gradients to average
        self._modules.append(module)
        wrapped: nn.Module = _Recompute(module) if self.recompute_activations else module
        if self.dp_size > 1:
            device_ids = [self.root_device.index] if self.root_device.type not in ("cpu", "mps") else None
            wrapped = DistributedDataParallel(wrapped, device_ids=device_ids, process_group=self._dp_group)
        return wrapped

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        return module.module if isinstance(module, _Recompute) else module

    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Any:
        if enabled and isinstance(module, DistributedDataParallel):
            return module.no_sync()
        return super().no_backward_sync(module, enabled)

    def backward(self, loss: torch.Tensor, module: nn.Module | None = None, **kwargs: Any) -> None:
        loss.backward(**kwargs)
        self._grads_finished = False

    def _finish_gradients(self) -> None:
        """Sequence parallelism: sum the gradients of whole-held weights over the tensor-parallel group, once per step.

        Each rank saw only its part of the sequence, so its gradient of a weight it holds whole is a
        partial sum (megatron-core marks those weights ``sequence_parallel``).
        """
        if self._grads_finished or not self.sequence_parallelism or self.tp_degree == 1:
            return
        for module in self._modules:
            for p in module.parameters():
                if p.grad is not None and getattr(p, "sequence_parallel", False):
                    dist.all_reduce(p.grad, group=self._tp_group)
        self._grads_finished = True

    def optimizer_step(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        self._finish_gradients()
        if self.gradient_clipping:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.clip_grad_norm_(params, self.gradient_clipping)
        result = optimizer.step(**kwargs)
        self._grads_finished = False
        return result

    def step_function(self, optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
        if not self.gradient_clipping and not (self.sequence_parallelism and self.tp_degree > 1):
            return optimizer.step  # nothing of ours to do between the loop and the optimizer
        return super().step_function(optimizer)

    def grad_norm(self, parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
        """The whole model's gradient norm: split weights summed over the tensor-parallel group, whole ones counted once."""
        self._finish_gradients()
        with_grads = [(p, p.grad) for p in parameters if p.grad is not None]
        split = [grad.detach().float() for p, grad in with_grads if _is_split(p)]
        whole = [grad.detach().float() for p, grad in with_grads if not _is_split(p)]
        norm_type = float(norm_type)
        device = self.root_device
        if math.isinf(norm_type):
            split_max = torch.zeros((), dtype=torch.float32, device=device)
            for g in split:
                split_max = torch.maximum(split_max, g.abs().max())
            if self.tp_degree > 1:
                dist.all_reduce(split_max, op=dist.ReduceOp.MAX, group=self._tp_group)
            for g in whole:
                split_max = torch.maximum(split_max, g.abs().max())
            return split_max
        powered = torch.zeros((), dtype=torch.float32, device=device)
        for g in split:
            powered += torch.linalg.vector_norm(g, norm_type) ** norm_type
        if self.tp_degree > 1:
            dist.all_reduce(powered, group=self._tp_group)
        for g in whole:
            powered += torch.linalg.vector_norm(g, norm_type) ** norm_type
        return powered ** (1.0 / norm_type)

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale the gradients so that the whole model's norm is at most ``max_norm``; return the norm before."""
        parameters = [p for p in parameters if p.grad is not None]
        total = self.grad_norm(parameters, norm_type)
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for grad in (p.grad for p in parameters):
            if grad is not None:
                grad.detach().mul_(coefficient.to(grad.dtype))
        return total

    # -- full weights ------------------------------------------------------------------------------------------
    def _full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter and buffer whole: split weights gathered from the tensor-parallel group."""
        inner = self.unwrap_module(module)
        state: dict[str, torch.Tensor] = {}
        for name, p in inner.named_parameters():
            tensor = p.detach()
            if _is_split(p) and self.tp_degree > 1:
                self._check_stride(name, p)
                parts = [torch.empty_like(tensor) for _ in range(self.tp_degree)]
                dist.all_gather(parts, tensor.contiguous(), group=self._tp_group)
                tensor = torch.cat(parts, dim=_split_dim(p))
            state[name] = tensor.cpu().clone().contiguous()
        for name, buffer in inner.named_buffers():
            state[name] = buffer.detach().cpu().clone().contiguous()
        return state

    @staticmethod
    def _check_stride(name: str, p: torch.Tensor) -> None:
        stride = getattr(p, "partition_stride", 1)
        if stride != 1:
            raise NotImplementedError(f"{name} is split with stride {stride}; only stride 1 can be "
                                      "gathered into full weights here.")

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full weights, on every rank (a collective: every process calls it)."""
        return self._full_state(module)

    def save_module(self, module: nn.Module, path: Path) -> None:
        """Rank 0 writes the full weights as one safetensors file (the slices gathered)."""
        state = self._full_state(module)
        if self.process_index == 0:
            save_file(state, str(path), metadata={"format": "pt"})

    def load_module(self, module: nn.Module, path: Path, strict: bool = True) -> None:
        """Load full weights; every rank keeps its slice of the split ones."""
        inner = self.unwrap_module(module)
        loaded = load_file(str(path))
        entries = dict(inner.named_parameters()) | dict(inner.named_buffers())
        missing, unexpected = sorted(set(entries) - set(loaded)), sorted(set(loaded) - set(entries))
        check_loaded_keys(path, missing, unexpected, strict)
        with torch.no_grad():
            for name, tensor in entries.items():
                if name not in loaded:
                    continue
                full = loaded[name]
                if _is_split(tensor) and self.tp_degree > 1:
                    self._check_stride(name, tensor)
                    full = full.chunk(self.tp_degree, dim=_split_dim(tensor))[self.tp_rank]
                tensor.copy_(full.to(tensor.dtype))

    # -- checkpoints: each tensor-parallel rank's slices ---------------------------------------------------------
    def save_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        """The first data-parallel replica writes one file pair per tensor-parallel rank: its slices and optimizer state.

        The other replicas hold the same (their gradients were averaged), so writing them would only repeat it.
        """
        from .state_format import save_state_files, write_json

        folder = directory / _STATE_DIR
        if self.dp_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            state = {"models": [self._local_state(m) for m in modules],
                     "optimizers": [optimizer.state_dict() for optimizer in optimizers]}
            save_state_files(state, folder, f"tp_rank_{self.tp_rank}")
        if self.process_index == 0:
            from megatron.core.package_info import __version__

            write_json(folder / "meta.json", {
                "tp_degree": self.tp_degree, "pp_degree": self.pp_degree, "dp_size": self.dp_size,
                "megatron_core_version": __version__,
                "models": [{name: {"shape": list(p.shape), "partition_dim": _split_dim(p) if _is_split(p) else None}
                            for name, p in self.unwrap_module(m).named_parameters()} for m in modules]})
        return True

    def _local_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        inner = self.unwrap_module(module)
        return {name: t.detach() for name, t in [*inner.named_parameters(), *inner.named_buffers()]}

    def load_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        """Restore this rank's slices and optimizer state; the number of data-parallel replicas may change."""
        from .state_format import load_state_files, read_json

        folder = directory / _STATE_DIR
        if not folder.is_dir():
            return False
        meta = read_json(folder / "meta.json")
        if (meta["tp_degree"], meta["pp_degree"]) != (self.tp_degree, self.pp_degree):
            raise ValueError(f"{directory} holds the slices of tp_degree={meta['tp_degree']}, pp_degree={meta['pp_degree']}; "
                             f"this run has tp_degree={self.tp_degree}, pp_degree={self.pp_degree}. Resume with the same "
                             "layout, or start a new run from full weights written by accelerator.save_model().")
        state = load_state_files(folder, f"tp_rank_{self.tp_rank}", device=self.root_device)
        if len(state["models"]) < len(modules) or len(state["optimizers"]) < len(optimizers):
            raise ValueError(f"{directory} holds {len(state['models'])} model(s) and {len(state['optimizers'])} "
                             f"optimizer(s); this run prepared {len(modules)} and {len(optimizers)}.")
        with torch.no_grad():
            for module, saved in zip(modules, state["models"]):
                entries = self._local_state(module)
                missing, unexpected = sorted(set(entries) - set(saved)), sorted(set(saved) - set(entries))
                if missing or unexpected:
                    raise RuntimeError(f"{directory} does not match the model: missing keys {missing}, "
                                       f"unexpected keys {unexpected}.")
                for name, tensor in entries.items():
                    tensor.copy_(saved[name])
        for optimizer, saved in zip(optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        self._grads_finished = False
        return True
