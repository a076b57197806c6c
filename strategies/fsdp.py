"""FSDP: parameters, gradients and optimizer state sharded across processes with ``fully_shard``.

Everything here is torch's own machinery, configured: ``fully_shard`` (FSDP2) shards each wrap
unit and the model, a ``DeviceMesh`` says which processes shard and which replicate, a
``MixedPrecisionPolicy`` follows the Accelerator's precision, ``torch.utils.checkpoint`` recomputes
the units' activations, the ``torch.distributed.checkpoint.state_dict`` helpers move state between
the sharded model and whole tensors, and ``torch.distributed.checkpoint`` writes sharded checkpoints
(see ``strategies.fsdp_checkpoint``).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from . import fsdp_checkpoint, tensor_parallel
from .base import Strategy, check_loaded_keys
from .spec import Option, StrategySpec

if TYPE_CHECKING:
    from trainer.parallelism import ParallelismConfig
    from trainer.strategies.pipeline_parallel import PipelineStages

WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
# Sharding strategy (FSDP1's names and numbers) -> (mesh layout, reshard parameters after forward).
SHARDING_STRATEGIES = {"FULL_SHARD": ("shard", True), "SHARD_GRAD_OP": ("shard", False), "NO_SHARD": ("replicate", False),
                       "HYBRID_SHARD": ("hybrid", True), "HYBRID_SHARD_ZERO2": ("hybrid", False)}
_SHARDING_NUMBERS = {1: "FULL_SHARD", 2: "SHARD_GRAD_OP", 3: "NO_SHARD", 4: "HYBRID_SHARD", 5: "HYBRID_SHARD_ZERO2"}
STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT")
BACKWARD_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")
_YAML_ONLY = "Accepted so that files written for FSDP 1 load: fully_shard is FSDP 2 and always keeps the original parameters."


class FSDP(Strategy):
    """Fully sharded data parallel training (``torch.distributed.fsdp.fully_shard``).

    Args:
        auto_wrap_policy: which submodules become shard units of their own: ``"TRANSFORMER_BASED_WRAP"``
            (the classes named in ``transformer_layer_cls_to_wrap``, or the model's ``_no_split_modules``),
            ``"SIZE_BASED_WRAP"`` (submodules of at least ``min_num_params`` parameters), ``"NO_WRAP"``, or a
            callable ``policy(submodule) -> bool``.
        sharding_strategy: ``"FULL_SHARD"`` (1), ``"SHARD_GRAD_OP"`` (2), ``"NO_SHARD"`` (3),
            ``"HYBRID_SHARD"`` (4) or ``"HYBRID_SHARD_ZERO2"`` (5).
        reshard_after_forward: overrides what ``sharding_strategy`` implies.
        hybrid_shard_size: processes per shard group for the hybrid strategies (default: the processes
            of one machine, ``LOCAL_WORLD_SIZE``).
        offload_params: keep sharded parameters, gradients and the optimizer step on the CPU.
        state_dict_type: ``"SHARDED_STATE_DICT"`` (each process writes its shards, DCP) or
            ``"FULL_STATE_DICT"`` (one safetensors file of whole tensors).
        activation_checkpointing: recompute each wrap unit's activations in backward.
        mixed_precision: the unit parameters' dtype during forward/backward: ``"auto"`` follows the
            Accelerator's precision policy; a ``torch.dtype`` (``torch.bfloat16``) sets it; None keeps
            the parameters' own dtype.
        backward_prefetch: when the next unit's parameters are gathered in backward (fully_shard: always before).
        forward_prefetch: gather the next unit's parameters while the current unit runs forward.
        cpu_ram_efficient_loading: process 0 holds the real weights, the others build the model on the
            meta device (``module_sharded_context``) and receive their shards.
        sync_module_states: start every process from process 0's weights and buffers.
    """

    spec = StrategySpec(
        name="fsdp", summary="fully sharded data parallel: parameters, gradients and optimizer state sharded (fully_shard)",
        distributed_types=("FSDP",), section="fsdp_config",
        options=(
            Option("fsdp_version", None, (int,), "FSDP 1 (FullyShardedDataParallel) or FSDP 2 (fully_shard).",
                   choices=(1, 2), unused=_YAML_ONLY),
            Option("fsdp_auto_wrap_policy", "auto_wrap_policy", (str,), "How modules are wrapped into FSDP units.",
                   choices=WRAP_POLICIES, question="FSDP auto wrap policy?"),
            Option("fsdp_backward_prefetch", "backward_prefetch", (str,),
                   "When the next parameters are gathered during backward.", choices=BACKWARD_PREFETCH),
            Option("fsdp_backward_prefetch_policy", "backward_prefetch", (str,),
                   "Older spelling of `fsdp_backward_prefetch`.", choices=BACKWARD_PREFETCH, flag=False),
            Option("fsdp_cpu_ram_efficient_loading", "cpu_ram_efficient_loading", (bool,),
                   "Load the weights on rank 0 only and broadcast them."),
            Option("fsdp_forward_prefetch", "forward_prefetch", (bool,), "Gather the next parameters during forward."),
            Option("fsdp_offload_params", "offload_params", (bool,), "Keep parameters (and gradients) on the CPU.",
                   question="Offload parameters to the CPU?"),
            Option("fsdp_sharding_strategy", "sharding_strategy", (str, int),
                   "What is sharded: parameters, gradients, optimizer state (name or Accelerate's number 1-5).",
                   choices=(*SHARDING_STRATEGIES, *_SHARDING_NUMBERS), question="FSDP sharding strategy?"),
            Option("fsdp_reshard_after_forward", "reshard_after_forward", (bool, str),
                   "Free the gathered parameters after forward (FSDP 2)."),
            Option("fsdp_state_dict_type", "state_dict_type", (str,), "Whether checkpoints hold full or sharded state.",
                   choices=STATE_DICT_TYPES, question="FSDP state dict type?", ask_default="SHARDED_STATE_DICT"),
            Option("fsdp_sync_module_states", "sync_module_states", (bool,), "Broadcast rank 0's weights at wrap time."),
            Option("fsdp_use_orig_params", None, (bool,), "Keep the original parameters visible to the optimizer (FSDP 1).",
                   unused=_YAML_ONLY),
            Option("fsdp_transformer_layer_cls_to_wrap", "transformer_layer_cls_to_wrap", (str, list),
                   "Class name(s) of the layers wrapped by `TRANSFORMER_BASED_WRAP`."),
            Option("fsdp_min_num_params", "min_num_params", (int,), "Parameter threshold of `SIZE_BASED_WRAP`."),
            Option("fsdp_activation_checkpointing", "activation_checkpointing", (bool,),
                   "Recompute activations of the wrapped layers during backward."),
        ))

    def __init__(self, auto_wrap_policy: str | Callable[[nn.Module], bool] = "TRANSFORMER_BASED_WRAP",
                 transformer_layer_cls_to_wrap: str | Iterable[str | type] | None = None,
                 min_num_params: int = 100_000_000, sharding_strategy: str | int = "FULL_SHARD",
                 reshard_after_forward: bool | str | None = None, hybrid_shard_size: int | None = None,
                 offload_params: bool = False, state_dict_type: str = "FULL_STATE_DICT",
                 activation_checkpointing: bool = False, mixed_precision: str | torch.dtype | None = "auto",
                 backward_prefetch: str = "BACKWARD_PRE", forward_prefetch: bool = False,
                 cpu_ram_efficient_loading: bool = False, sync_module_states: bool = True,
                 parallelism: ParallelismConfig | None = None) -> None:
        super().__init__()
        if not callable(auto_wrap_policy) and auto_wrap_policy not in WRAP_POLICIES:
            raise ValueError(f"FSDP(auto_wrap_policy={auto_wrap_policy!r}): use one of {list(WRAP_POLICIES)} or a "
                             "callable that says, for a submodule, whether it is a shard unit.")
        sharding = _SHARDING_NUMBERS.get(sharding_strategy, "") if isinstance(sharding_strategy, int) else sharding_strategy
        if sharding not in SHARDING_STRATEGIES:
            raise ValueError(f"FSDP(sharding_strategy={sharding_strategy!r}): use one of {list(SHARDING_STRATEGIES)} "
                             "(or their numbers 1-5).")
        if state_dict_type not in STATE_DICT_TYPES:
            raise ValueError(f"FSDP(state_dict_type={state_dict_type!r}): use one of {list(STATE_DICT_TYPES)}.")
        if backward_prefetch not in BACKWARD_PREFETCH:
            raise ValueError(f"FSDP(backward_prefetch={backward_prefetch!r}): use one of {list(BACKWARD_PREFETCH)}.")
        if backward_prefetch != "BACKWARD_PRE":
            warnings.warn(f"FSDP(backward_prefetch={backward_prefetch!r}) has no effect: fully_shard always gathers the "
                          "next unit's parameters before the current unit's gradients are computed (BACKWARD_PRE).",
                          stacklevel=2)
        if not (mixed_precision is None or mixed_precision == "auto" or isinstance(mixed_precision, torch.dtype)):
            raise ValueError(f"FSDP(mixed_precision={mixed_precision!r}): use \"auto\" (follow the Accelerator's precision), "
                             "a torch dtype (torch.bfloat16) or None (the parameters' own dtype).")
        if parallelism is not None and SHARDING_STRATEGIES[sharding][0] != "shard":
            raise ValueError(f"FSDP(sharding_strategy={sharding!r}) lays out replicas itself, and a ParallelismConfig was "
                             "given too: set the layout once, with ParallelismConfig(dp_replicate_size=..., "
                             "dp_shard_size=...), and keep sharding_strategy FULL_SHARD or SHARD_GRAD_OP.")
        if hybrid_shard_size is not None and hybrid_shard_size < 1:
            raise ValueError(f"FSDP(hybrid_shard_size={hybrid_shard_size}): a shard group has at least one process.")
        if isinstance(transformer_layer_cls_to_wrap, str):
            transformer_layer_cls_to_wrap = [name.strip() for name in transformer_layer_cls_to_wrap.split(",") if name.strip()]
        if isinstance(reshard_after_forward, str):
            reshard_after_forward = reshard_after_forward.strip().lower() == "true"
        self.auto_wrap_policy = auto_wrap_policy
        self.layer_classes = None if transformer_layer_cls_to_wrap is None else list(transformer_layer_cls_to_wrap)
        self.min_num_params = min_num_params
        self.sharding_strategy = sharding
        self.mesh_layout, implied_reshard = SHARDING_STRATEGIES[sharding]
        self.reshard_after_forward = implied_reshard if reshard_after_forward is None else bool(reshard_after_forward)
        self.hybrid_shard_size = hybrid_shard_size
        self.offload_params = offload_params
        # LOCAL_STATE_DICT meant FSDP1's flat local shards; fully_shard's local shards are what SHARDED writes.
        self.state_dict_type = "SHARDED_STATE_DICT" if state_dict_type == "LOCAL_STATE_DICT" else state_dict_type
        self.activation_checkpointing = activation_checkpointing
        self.mixed_precision = mixed_precision
        self.backward_prefetch, self.forward_prefetch = backward_prefetch, forward_prefetch
        self.cpu_ram_efficient_loading, self.sync_module_states = cpu_ram_efficient_loading, sync_module_states
        self.parallelism = parallelism  # an N-D layout (data-parallel replicate x shard x tensor), or None
        self._module: nn.Module | None = None
        self._replaced: dict[int, nn.Parameter] = {}
        self._mesh: Any = None
        self._pipelines: list[PipelineStages] = []
        self._stage_units: list[str] = []  # the names of the wrap units in the model cut into pipeline stages
        self._precision_seen, self._precision_dtype = False, None

    def setup_environment(self, device: torch.device, process_index: int = 0, num_processes: int = 1) -> None:
        super().setup_environment(device, process_index, num_processes)
        if self.parallelism is not None:
            self.parallelism.check_processes(num_processes)  # before any work
        if self.is_distributed:
            self._mesh = None  # built when the first model is prepared (every process takes part)
            self._shard_layout()  # an impossible hybrid layout fails here, before any work

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        """Data is sharded over the data-parallel processes; those of one tensor-parallel group read the same batches."""
        if not self.is_distributed:
            return None
        if self.parallelism is None:
            return {"num_replicas": self.num_processes, "rank": self.process_index}
        return {"num_replicas": self.parallelism.dp_size, "rank": self.parallelism.dp_rank(self.process_index)}

    def setup_policies(self, precision: Any, accumulation: Any) -> Any:
        """Remember the precision policy's compute dtype: with ``mixed_precision="auto"`` the units follow it."""
        dtype = getattr(precision, "dtype", None)
        mixed = getattr(precision, "is_mixed", False) and isinstance(dtype, torch.dtype)
        self._precision_seen, self._precision_dtype = True, dtype if mixed else None
        return precision

    # -- the process layout ----------------------------------------------------------------------------
    def _shard_layout(self) -> tuple[int, int] | None:
        """(replicas, processes per shard group) for a 2-D mesh, or None for a 1-D (fully sharded) one."""
        n = self.num_processes
        if self.mesh_layout == "shard":  # always so beside a ParallelismConfig (the constructor refuses the others)
            return None
        if self.mesh_layout == "replicate":
            return n, 1
        size = self.hybrid_shard_size
        if size is None:
            local = os.environ.get("LOCAL_WORLD_SIZE")
            if local is None:
                raise ValueError(f"FSDP(sharding_strategy={self.sharding_strategy!r}) shards within a machine and "
                                 "replicates across machines, but the number of processes per machine is unknown "
                                 "(no LOCAL_WORLD_SIZE): pass FSDP(hybrid_shard_size=...).")
            size = int(local)
        if size > n or n % size:
            raise ValueError(f"FSDP(sharding_strategy={self.sharding_strategy!r}): {n} processes cannot form a "
                             f"(replicate x shard) mesh with shard groups of {size} processes; the process count must be "
                             "a multiple of the shard group size (hybrid_shard_size, by default the processes per "
                             "machine).")
        return n // size, size

    @property
    def parallelism_config(self) -> ParallelismConfig | None:
        return self.parallelism

    @property
    def device_mesh(self) -> Any:
        """The N-D layout's mesh (built now if no model was prepared yet), or the data-parallel mesh once built."""
        return self._device_mesh() if self.parallelism is not None else self._mesh

    def _device_mesh(self) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        if self._mesh is None and self.parallelism is not None:
            self._mesh = self.parallelism.build_device_mesh(self.root_device.type)
        elif self._mesh is None:
            layout = self._shard_layout()
            if layout is None:
                self._mesh = init_device_mesh(self.root_device.type, (self.num_processes,), mesh_dim_names=("shard",))
            else:
                self._mesh = init_device_mesh(self.root_device.type, layout, mesh_dim_names=("replicate", "shard"))
        return self._mesh

    # -- placing the model ---------------------------------------------------------------------------
    def _units(self, module: nn.Module) -> list[nn.Module]:
        """The submodules that become shard units of their own, innermost first."""
        # Containers without a forward of their own (ModuleList, ModuleDict) are never called: not units.
        candidates = [m for m in list(module.modules())[1:][::-1]
                      if not (isinstance(m, (nn.ModuleList, nn.ModuleDict)) and type(m).forward is nn.Module.forward)]
        policy = self.auto_wrap_policy
        if callable(policy):
            return [m for m in candidates if policy(m)]
        if policy == "NO_WRAP":
            return []
        if policy == "SIZE_BASED_WRAP":
            return [m for m in candidates if sum(p.numel() for p in m.parameters()) >= self.min_num_params]
        wanted = self.layer_classes or list(getattr(module, "_no_split_modules", None) or [])
        names = {c if isinstance(c, str) else c.__name__ for c in wanted}
        present = {type(m).__name__ for m in candidates}
        if self.layer_classes and not names & present:
            close = difflib.get_close_matches(sorted(names)[0], sorted(present), n=1)
            raise ValueError(f"FSDP: no submodule of {type(module).__name__} is a {sorted(names)} (the "
                             "transformer_layer_cls_to_wrap)." + (f" Did you mean {close[0]!r}?" if close else "")
                             + f" Its classes: {sorted(present)[:20]}.")
        return [m for m in candidates if type(m).__name__ in names]

    def _precision_policy(self, module: nn.Module) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype: torch.dtype | None
        if not isinstance(self.mixed_precision, str):  # a dtype, or None: set, not "auto"
            dtype = self.mixed_precision
        elif self._precision_seen:
            dtype = self._precision_dtype
        else:  # an Accelerator that does not call setup_policies: read the policy off the prepared forward
            dtype = _autocast_dtype(module)
        if dtype is None:
            return MixedPrecisionPolicy()
        # Units compute in the low dtype (gathered in it: half the traffic); gradients are reduced in fp32.
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Checkpoint and shard the wrap units, then the model; start every process from process 0's weights.

        Every process must call it with the same model structure: the steps below are collective.
        With pipeline stages (``pp_size > 1``) the model is returned whole, in a ``PipelineStages``
        that cuts it and shards its stage at the first ``forward_backward``.
        """
        if self.is_distributed and self.parallelism is not None and self.parallelism.pp_size > 1:
            return self._pipeline(module)
        units = self._units(module)
        if self.activation_checkpointing:
            leaves = [u for u in units if not any(other is not u and _contains(u, other) for other in units)]
            if not leaves:
                raise ValueError(f"FSDP(activation_checkpointing=True) recomputes each wrap unit, and "
                                 f"auto_wrap_policy={self.auto_wrap_policy!r} makes none in {type(module).__name__}: "
                                 "name its layer classes (transformer_layer_cls_to_wrap) or use SIZE_BASED_WRAP.")
            for unit in leaves:
                _checkpoint_activations(unit)
        if not self.is_distributed:  # one process: nothing to shard across; the model stays whole
            self._module = module.to(self.root_device)
            return self._module
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

        before = dict(module.named_parameters())
        on_meta = any(t.is_meta for t in (*module.parameters(), *module.buffers()))
        flags = torch.tensor([float(on_meta), float(on_meta and self.process_index == 0)], device=self.root_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every process must take the same path below
        if flags[1]:
            raise ValueError("FSDP: process 0 built the model on the meta device, but it must hold the real weights "
                             "that the other processes receive (build on meta only where process_index != 0, e.g. "
                             "inside strategy.module_sharded_context()).")
        from_rank0 = bool(flags[0]) or self.cpu_ram_efficient_loading
        broadcast = from_rank0 or self.sync_module_states
        full = module.state_dict() if broadcast and self.process_index == 0 else {}
        buffers = dict(module.named_buffers()) if broadcast and self.process_index == 0 else {}
        # With cpu_ram_efficient_loading no process materialises the whole model on the device: all
        # shard on meta, allocate their own shards, then take process 0's values.
        module = module.to("meta") if from_rank0 else module.to(self.root_device)
        mesh = self._device_mesh()
        if self.parallelism is not None and self.parallelism.tp_size > 1:
            tensor_parallel.parallelize(module, mesh["tp"], self.parallelism.tp_plan)
        shard_mesh = mesh if self.parallelism is None else tensor_parallel.data_parallel_mesh(mesh)
        options: dict[str, Any] = {"mesh": shard_mesh, "mp_policy": self._precision_policy(module)}
        if self.offload_params:
            # Pinned memory needs an accelerator; on a CPU-only machine the shards are on the CPU anyway.
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=self.root_device.type != "cpu")
        for unit in units if shard_mesh is not None else []:
            fully_shard(unit, reshard_after_forward=self.reshard_after_forward, **options)
        if shard_mesh is not None:  # the root's parameters are used first in backward: by default (None) kept after forward
            fully_shard(module, reshard_after_forward=None if self.reshard_after_forward else False, **options)
        if self.forward_prefetch and shard_mesh is not None:
            ordered = [u for u in module.modules() if any(u is unit for unit in units)]
            for unit, following in zip(ordered, ordered[1:], strict=False):
                cast(FSDPModule, unit).set_modules_to_forward_prefetch([cast(FSDPModule, following)])
        if from_rank0:
            module.to_empty(device="cpu" if self.offload_params else self.root_device)
            _buffers_to(module, self.root_device)
        if broadcast:
            set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            for name, buffer in module.named_buffers():  # non-persistent buffers are in no state dict
                if name in buffers:
                    buffer.copy_(buffers[name])
                dist.broadcast(buffer, src=0)
        del full, buffers
        # fully_shard puts new (sharded) parameters in place of the old ones; an optimizer built
        # before preparation still holds the old ones, so setup_optimizer swaps them.
        after = dict(module.named_parameters())
        self._replaced = {id(old): after[name] for name, old in before.items() if name in after}
        self._module = module
        return module

    def _pipeline(self, module: nn.Module) -> nn.Module:
        from trainer.strategies.pipeline_parallel import PipelineStages

        config = cast("ParallelismConfig", self.parallelism)
        dtype = self._precision_policy(module).param_dtype
        if dtype == torch.float16:
            raise ValueError("mixed_precision='fp16' with pipeline stages (pp_size > 1): fp16 loss scaling would have to "
                             "agree on overflows across stages, which it does not here. Use mixed_precision='bf16' "
                             "(no loss scaling) or 'no'.")
        pp = self._device_mesh()["pp"]
        units = self._units(module)  # by name: a traced stage keeps the model's module names, and calls them
        self._stage_units = [name for name, sub in module.named_modules() if any(sub is unit for unit in units)][::-1]
        stages = PipelineStages(module.to(self.root_device), pp_group=pp.get_group(), num_stages=config.pp_size,
                                stage_index=pp.get_local_rank(), schedule=config.pp_schedule,
                                microbatches=config.pp_microbatches or config.pp_size,
                                split_points=config.pp_split_points, shard=self._shard_stage, device=self.root_device,
                                autocast=self._stage_autocast(dtype))
        self._pipelines.append(stages)
        self._module = stages
        return stages

    def _stage_autocast(self, dtype: torch.dtype | None) -> Callable[[], Any]:
        """The autocast that pipeline stages run in: the precision policy's compute ``dtype`` (stages are traced
        without the policy's wrapper)."""
        if dtype is None:
            return contextlib.nullcontext
        return functools.partial(torch.autocast, self.root_device.type, dtype=dtype)

    def _shard_stage(self, stage: nn.Module) -> nn.Module:
        """Start a pipeline stage from the weights of its first data-parallel process, then shard it over the
        data-parallel processes: the model's wrap units it holds (the traced stage calls them as modules), then the
        stage itself."""
        from torch.distributed.fsdp import fully_shard

        mesh = tensor_parallel.data_parallel_mesh(self._device_mesh())
        if mesh is None:
            return stage
        for name in mesh.mesh_dim_names:
            group = mesh.get_group(name)
            source = dist.get_global_rank(group, 0)
            for tensor in (*stage.parameters(), *stage.buffers()):
                dist.broadcast(tensor.data, src=source, group=group)
        # The traced graph holds the dtypes it was traced with: the weights are gathered as they are, and a
        # mixed-precision policy computes through the autocast the stages run in (_stage_autocast).
        options: dict[str, Any] = {"mesh": mesh}
        held = dict(stage.named_modules())
        for name in self._stage_units:  # innermost first
            if name in held:
                fully_shard(held[name], reshard_after_forward=self.reshard_after_forward, **options)
        fully_shard(stage, reshard_after_forward=None if self.reshard_after_forward else False, **options)
        return stage

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Point an optimizer built before ``prepare`` at the sharded parameters that replaced the originals."""
        for stages in self._pipelines:  # the stage is built later: its optimizer is re-pointed then
            held = {id(p) for p in stages.parameters()}
            if any(id(p) in held for group in optimizer.param_groups for p in group["params"]):
                stages.track(optimizer)
        if optimizer.state and self._replaced:
            raise ValueError("Prepare the optimizer before it has stepped: FSDP replaces the model's parameters, "
                             "and existing optimizer state could not follow them.")
        for group in optimizer.param_groups:
            group["params"] = [self._replaced.get(id(p), p) for p in group["params"]]
        return optimizer

    @contextmanager
    def module_sharded_context(self) -> Iterator[None]:
        """Build the model here: with ``cpu_ram_efficient_loading``, processes other than 0 build it on meta."""
        if self.cpu_ram_efficient_loading and self.is_distributed and self.process_index != 0:
            with torch.device("meta"):
                yield
        else:
            yield

    @contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Iterator[None]:
        """Micro-steps keep unsharded, unreduced gradients; the boundary's backward reduce-scatters them once."""
        from torch.distributed.fsdp import FSDPModule

        if not enabled or not isinstance(module, FSDPModule):
            yield
            return
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the norm of the whole gradient: each mesh's part reduced over its processes by DTensor, then combined.

        With tensor parallelism the parameters lie on two meshes (data-parallel x tensor-parallel
        for the split layers, data-parallel for the rest); DTensor reduces a norm over one mesh only.
        """
        by_mesh: dict[Any, list[torch.Tensor]] = {}
        for parameter in parameters:
            if parameter.grad is not None:
                by_mesh.setdefault(getattr(parameter.grad, "device_mesh", None), []).append(parameter)
        norms = []
        for group in by_mesh.values():
            norm = torch.nn.utils.get_total_norm([cast(torch.Tensor, p.grad) for p in group], norm_type)
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        total = torch.nn.utils.get_total_norm(norms, norm_type) if norms else torch.zeros((), device=self.root_device)
        if self._pipelines:  # each stage holds part of the model: the whole norm combines theirs
            total = _combine_norms(total, norm_type, self._device_mesh()["pp"].get_group())
        if not norms:
            return total
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    # -- checkpoints -----------------------------------------------------------------------------------
    def save_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        """With SHARDED_STATE_DICT, every process writes its own shards (DCP, safetensors).

        Pipeline stages always do: no process holds the whole model to write it.
        """
        if self.state_dict_type != "SHARDED_STATE_DICT" and not self._pipelines:
            return False
        self._require_stages("save_state")
        fsdp_checkpoint.save_sharded_state(modules, optimizers, Path(directory), self.process_index, self.num_processes)
        return True

    def save_training_state_async(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                                  directory: Path, process_group: Any) -> Future[Any] | None:
        """With SHARDED_STATE_DICT: DCP's ``async_save`` copies the shards now and writes them in the background."""
        if self.state_dict_type != "SHARDED_STATE_DICT" and not self._pipelines:
            return None
        self._require_stages("save_state")
        return fsdp_checkpoint.save_sharded_state(modules, optimizers, Path(directory), self.process_index,
                                                  self.num_processes, background=True, process_group=process_group)

    def load_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        """Read a sharded checkpoint whatever ``state_dict_type`` is, and whatever number of processes wrote it."""
        folder = Path(directory) / fsdp_checkpoint.DIRECTORY
        if not (folder / fsdp_checkpoint.INFO_FILE).is_file():
            if self._pipelines:
                raise ValueError(f"{directory} holds no sharded state, and pipeline stages load only sharded "
                                 "checkpoints (every checkpoint written with pipeline stages, or with FSDP's "
                                 "state_dict_type='SHARDED_STATE_DICT').")
            return False
        unbuilt = [stages for stages in self._pipelines if not stages.built]
        if unbuilt:  # read once the stages are cut from the model, at the first forward_backward
            unbuilt[0].after_build(lambda: fsdp_checkpoint.load_sharded_state(modules, optimizers, folder))
            return True
        fsdp_checkpoint.load_sharded_state(modules, optimizers, folder)
        return True

    def _require_stages(self, doing: str) -> None:
        for stages in self._pipelines:
            stages.require_built(doing)

    def _options(self, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**{"full_state_dict": True, "cpu_offload": True, **kwargs})

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The whole tensors, gathered onto process 0's CPU (the other processes get an empty dict)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if not self.is_distributed:
            return module.state_dict()
        if any(module is stages for stages in self._pipelines):  # each stage gathers its part, then process 0 all
            stages = cast("PipelineStages", module)
            local = cast(dict[str, torch.Tensor], get_model_state_dict(module, options=self._options(cpu_offload=False))
                         if stages.built else module.state_dict())
            whole = stages.whole_state_dict({name: value.cpu() for name, value in local.items()})
            return whole if self.process_index == 0 else {}
        return cast(dict[str, torch.Tensor], get_model_state_dict(module, options=self._options()))

    def save_module(self, module: nn.Module, path: Path) -> None:
        """One safetensors file of whole tensors, gathered onto process 0's CPU and written there."""
        state = self.full_state_dict(module)
        if self.process_index == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    def load_module(self, module: nn.Module, path: Path, strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        state = load_file(str(path))
        expected = set(self.model_keys(module))
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        check_loaded_keys(path, missing, unexpected, strict)
        set_model_state_dict(module, dict(state), options=self._options(strict=strict))

    @staticmethod
    def model_keys(module: nn.Module) -> list[str]:
        return list(module.state_dict().keys())

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The whole optimizer state, keyed by parameter name (an optimizer that has not stepped stays fresh)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        fresh = not optimizer.state
        state = get_optimizer_state_dict(self._require_module(), optimizer, options=self._options())
        if fresh:  # the helper initialised it with a step at learning rate 0; that step was never taken
            optimizer.state.clear()
            state = {**state, "state": {}}
        return state

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        has_tensors = any(torch.is_tensor(v) for per_param in state.get("state", {}).values() for v in per_param.values())
        if not has_tensors:  # e.g. plain SGD: only the hyperparameters (lr...) to restore
            for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
                group.update({k: v for k, v in saved.items() if k != "params"})
            return
        set_optimizer_state_dict(self._require_module(), optimizer, state, options=self._options())

    def _require_module(self) -> nn.Module:
        if self._module is None:
            raise RuntimeError("FSDP needs the model prepared before its optimizer state can be saved or loaded.")
        return self._module


def _combine_norms(norm: torch.Tensor, norm_type: float, group: Any) -> torch.Tensor:
    """The norm of the concatenation of every process's part, from each part's ``norm``."""
    if norm_type == float("inf"):
        norm = norm.clone()
        dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=group)
        return norm
    powered = norm.double() ** norm_type
    dist.all_reduce(powered, group=group)
    return (powered ** (1.0 / norm_type)).to(norm.dtype)


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _checkpoint_activations(unit: nn.Module) -> None:
    """Recompute ``unit``'s activations in backward instead of keeping them (names and state dict unchanged).

    The unit's ``forward`` runs under ``torch.utils.checkpoint``; its FSDP hooks stay outside, so the
    recomputation in backward uses the parameters that backward has gathered anyway.
    """
    from torch.utils.checkpoint import checkpoint

    if getattr(unit.forward, "func", None) is checkpoint:
        return
    unit.forward = functools.partial(checkpoint, unit.forward, use_reentrant=False)


def _autocast_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype the Accelerator's precision policy autocasts ``module``'s forward to (None: full precision).

    ``prepare`` wraps a mixed-precision model's forward (keeping the original as ``_original_forward``)
    in a closure over the policy, which knows its dtype.
    """
    forward = module.__dict__.get("forward")
    if forward is None or "_original_forward" not in module.__dict__:
        return None
    try:
        policy = inspect.getclosurevars(forward).nonlocals.get("self")
    except TypeError:  # not a plain function: not the precision policy's wrapper
        return None
    dtype = getattr(policy, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    for submodule in module.modules():
        for name, buffer in submodule.named_buffers(recurse=False):
            if buffer.device != device:
                submodule._buffers[name] = buffer.to(device)
