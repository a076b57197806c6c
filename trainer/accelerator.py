"""``Accelerator``: the low-code level. A plain PyTorch loop runs on any device and any strategy.

The user keeps their loop; ``prepare`` hands back the same objects, wrapped so that the loop's
own calls (``model(x)``, ``optimizer.step()``, ``scheduler.step()``, ``for batch in loader``)
do the right thing for the chosen strategy, precision and accumulation. Everything backend-
specific is in the Strategy; everything dtype-specific is in the Precision policy; when to step
is the GradientAccumulation policy's call. This file only wires them together.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from trainer import checkpointing, operations, wrappers
from trainer import launch_environment as variables
from trainer.accelerator_settings import settle
from trainer.accelerator_state import AcceleratorState, GradientState
from trainer.accumulation import GradientAccumulation, MicroStep
from trainer.arguments import unknown_argument_error
from trainer.callbacks.trackers import Tracker, TrackersArgument, make_trackers
from trainer.checkpoint_async import CheckpointWriter, StagingBuffers
from trainer.checkpoint_hooks import LoadHook, SaveHook, StateHooks
from trainer.data_loader import PreparedDataLoader, Sharding, SkipFirstBatches, skip_first_batches
from trainer.devices import empty_cache
from trainer.gradient_sync import GradientSync
from trainer.layout_view import LayoutView
from trainer.model_files import shard_size_bytes, write_model_files, writes_whole_weights
from trainer.precision import Precision, canonical_precision, resolve_precision
from trainer.process_view import ProcessView
from trainer.profiling import Profiling
from trainer.strategies import Strategy, resolve_strategy
from trainer.strategies.registry import check_strategy_requirements
from trainer.tracking_view import TrackingView
from trainer.utils.configurations import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration
from trainer.utils.dynamo import TorchDynamoPlugin
from trainer.utils.enums import DistributedType, DynamoBackend, FP8BackendType, as_distributed_type
from trainer.utils.kwargs_handlers import KwargsHandler
from trainer.utils.other import save, strip_parallel_wrappers, unwrap_inside_compile
from trainer.utils.plugins import DeepSpeedPlugin, FullyShardedDataParallelPlugin, MegatronLMPlugin
from trainer.wrappers import AcceleratedOptimizer, AcceleratedScheduler, is_scheduler, prepare_order


class Accelerator(ProcessView, LayoutView, GradientSync, TrackingView, Profiling):
    """Make a PyTorch training loop device-, precision- and strategy-agnostic.

    Args:
        mixed_precision: ``"no"``/``"fp32"``, ``"fp16"`` or ``"bf16"``; by default what
            ``trainer launch`` set (``TRAINER_MIXED_PRECISION``), else ``"no"``.
        gradient_accumulation_steps: micro-batches per optimizer step (used with ``accumulate``).
        accumulation_normalize: ``"mean"`` (losses are means) or ``"tokens"`` (losses are sums;
            pass ``num_tokens`` to ``backward``); see ``trainer.accumulation``.
        cpu: run on the CPU even where an accelerator is present.
        strategy: ``"auto"``, a strategy name, or a ``Strategy`` object.
        project_dir: where ``save_state()`` with no directory writes numbered checkpoints.
        device_placement: move models and batches to ``accelerator.device``.
        step_scheduler_with_optimizer: the prepared scheduler advances only when the optimizer
            really steps (after accumulation, not on skipped fp16 steps).
        even_batches: with several processes, complete the last round of batches with samples from the
            start so every process steps equally often (``gather_for_metrics`` drops the extras); default True.
        split_batches: the data loader's batch size is the global one, cut among the processes
            (default: it is the per-process size).
        gradient_accumulation_plugin: a ``GradientAccumulationPlugin`` (or the ``GradientAccumulation``
            policy itself), instead of ``gradient_accumulation_steps``.
        log_with: experiment trackers: a name (``"mlflow"``, ``"wandb"``, ``"tensorboard"``, ...),
            ``"all"`` (every installed one), a Tracker, or a list of these. Started by
            ``init_trackers``, fed by ``log``, finished by ``end_training``; files go under
            ``project_dir`` (default: the working directory).
        kwargs_handlers: ``DistributedDataParallelKwargs``, ``GradScalerKwargs``, ``AutocastKwargs``,
            ``InitProcessGroupKwargs``, ``ProfileKwargs`` (``trainer.utils``): settings handed to the part
            that owns them.
        dataloader_config: a ``DataLoaderConfiguration`` (``split_batches``, ``even_batches``,
            ``data_seed``, ``non_blocking``...), instead of the arguments one by one.
        project_config: a ``ProjectConfiguration``: ``project_dir``, ``logging_dir``, automatic
            checkpoint naming and how many checkpoints to keep.
        fsdp_plugin: a ``FullyShardedDataParallelPlugin``: the FSDP strategy with its fields as options.
        deepspeed_plugin: a ``DeepSpeedPlugin``: the DeepSpeed strategy with its fields as options.
        megatron_lm_plugin: a ``MegatronLMPlugin``: the Megatron strategy with its fields as options.
        dynamo_backend: compile prepared models with ``torch.compile`` and this backend (``"inductor"``...);
            by default the launch's ``dynamo_config``, else no compiling.
        dynamo_plugin: a ``TorchDynamoPlugin`` (backend, mode, fullgraph, regional compilation...) instead.
        deepspeed_plugins: Accelerate's other name for ``deepspeed_plugin``.
        rng_types: checked and accepted: shuffling is seeded here, so no random state needs syncing.
        torch_tp_plugin: not available (give ``parallelism_config=ParallelismConfig(tp_size=...)``).
        parallelism_config: a ``ParallelismConfig``: data-parallel replicate x shard and tensor-parallel
            sizes, laid out on one ``DeviceMesh`` and trained with the FSDP strategy.
    """

    def __init__(
        self,
        mixed_precision: str | Precision | None = None,
        gradient_accumulation_steps: int | None = None,
        cpu: bool = False,
        strategy: str | Strategy | None = None,
        project_dir: str | os.PathLike | None = None,
        device_placement: bool = True,
        step_scheduler_with_optimizer: bool = True,
        accumulation_normalize: str = "mean",
        even_batches: bool | None = None,
        split_batches: bool | None = None,
        gradient_accumulation_plugin: GradientAccumulationPlugin | GradientAccumulation | None = None,
        log_with: TrackersArgument = None,
        kwargs_handlers: list[KwargsHandler] | None = None,
        dataloader_config: DataLoaderConfiguration | None = None,
        project_config: ProjectConfiguration | None = None,
        fsdp_plugin: FullyShardedDataParallelPlugin | None = None,
        deepspeed_plugin: DeepSpeedPlugin | dict[str, DeepSpeedPlugin] | None = None,
        megatron_lm_plugin: MegatronLMPlugin | None = None,
        dynamo_backend: DynamoBackend | str | None = None,
        dynamo_plugin: TorchDynamoPlugin | None = None,
        deepspeed_plugins: DeepSpeedPlugin | dict[str, DeepSpeedPlugin] | None = None,
        rng_types: list[str] | None = None,
        torch_tp_plugin: Any = None,
        parallelism_config: Any = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise unknown_argument_error("Accelerator", Accelerator.__init__, unknown)
        self.trackers: list[Tracker] = make_trackers(log_with)  # a missing package fails here, before any work
        # Everything the user passed is checked before the process group or any device is touched.
        if mixed_precision is None:
            mixed_precision = os.environ.get(variables.PRECISION, "no")
        if not isinstance(mixed_precision, Precision):
            mixed_precision = canonical_precision(mixed_precision)
        settings = settle(strategy=strategy, kwargs_handlers=kwargs_handlers, fsdp_plugin=fsdp_plugin,
                          deepspeed_plugin=deepspeed_plugin, megatron_lm_plugin=megatron_lm_plugin,
                          gradient_accumulation_steps=gradient_accumulation_steps,
                          gradient_accumulation_plugin=gradient_accumulation_plugin,
                          accumulation_normalize=accumulation_normalize, dataloader_config=dataloader_config,
                          split_batches=split_batches, even_batches=even_batches, project_config=project_config,
                          project_dir=project_dir, dynamo_backend=dynamo_backend, dynamo_plugin=dynamo_plugin,
                          deepspeed_plugins=deepspeed_plugins, rng_types=rng_types, torch_tp_plugin=torch_tp_plugin,
                          parallelism_config=parallelism_config)
        self.accumulation = settings.accumulation
        check_strategy_requirements(settings.strategy)  # a missing backend package fails here, before any work
        self.state = AcceleratorState.attach(self, cpu=cpu, plugins={
            "fsdp": fsdp_plugin, "deepspeed": deepspeed_plugin, "megatron_lm": megatron_lm_plugin,
            "dynamo": settings.dynamo}, **settings.state)
        self.gradient_state = GradientState.of(self.accumulation)
        self._state_generation = AcceleratorState.generation()
        self.strategy = resolve_strategy(settings.strategy, self.state.num_processes,
                                         arguments=settings.strategy_arguments)
        self.strategy.setup_environment(self.state.device, self.state.process_index, self.state.num_processes)
        precision = resolve_precision(mixed_precision, self.strategy.root_device, settings.scaler, settings.autocast)
        self.precision = self.strategy.setup_policies(precision, self.accumulation)
        self.project_configuration = settings.project
        self.dataloader_config = settings.loader
        self.profile_handler = settings.profile
        self.dynamo_plugin = settings.dynamo
        self.device_placement = device_placement
        self.step_scheduler_with_optimizer = step_scheduler_with_optimizer
        self.save_iteration = settings.project.iteration
        self._models: list[nn.Module] = []
        self._differentiated: torch.Tensor | None = None  # the last loss forward_backward returned
        # No loss scale and no engine's own backward: backward calls torch's directly (it runs at every step).
        self._plain_backward = (type(self.precision).scale_loss is Precision.scale_loss
                                and type(self.strategy).backward is Strategy.backward)
        self._optimizers: list[AcceleratedOptimizer] = []
        self._schedulers: list[AcceleratedScheduler] = []
        self._dataloaders: list[PreparedDataLoader] = []
        self._custom_objects: list[Any] = []
        self._state_hooks = StateHooks()  # register_save_state_pre_hook / register_load_state_pre_hook
        self._micro_step: MicroStep | None = None  # what accumulate() returns, kept for the same models
        self.checkpoint_writer = CheckpointWriter(self.state.num_processes)
        self._staging: StagingBuffers | None = None

    # -- facts ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.strategy.root_device

    @property
    def project_dir(self) -> Path | None:
        """The run's folder (``project_config.project_dir``): numbered checkpoints go to its ``checkpoints``."""
        folder = self.project_configuration.project_dir
        return Path(folder) if folder is not None else None

    @property
    def logging_dir(self) -> Path | None:
        """Where trackers write (``project_config.logging_dir``, by default the project folder)."""
        folder = self.project_configuration.logging_dir
        return Path(folder) if folder is not None else None

    @property
    def even_batches(self) -> bool:
        return self.dataloader_config.even_batches

    @property
    def split_batches(self) -> bool:
        return self.dataloader_config.split_batches

    @property
    def dispatch_batches(self) -> bool | None:
        return self.dataloader_config.dispatch_batches

    @property
    def non_blocking(self) -> bool:
        return self.dataloader_config.non_blocking

    @property
    def use_seedable_sampler(self) -> bool:
        return self.dataloader_config.use_seedable_sampler

    @property
    def use_stateful_dataloader(self) -> bool:
        return self.dataloader_config.use_stateful_dataloader

    @property
    def deepspeed_plugin(self) -> DeepSpeedPlugin | None:
        """The DeepSpeed plugin in use (None unless the strategy is DeepSpeed)."""
        return cast(AcceleratorState, self.state).deepspeed_plugin

    @property
    def fp8_backend(self) -> FP8BackendType:
        """Which library runs fp8 matmuls: ``AO`` (torchao), ``TE`` (TransformerEngine), or ``NO`` without fp8."""
        backend = getattr(self.precision, "backend", None) if self.mixed_precision == "fp8" else None
        return {"torchao": FP8BackendType.AO, "te": FP8BackendType.TE}.get(backend or "", FP8BackendType.NO)

    @property
    def mixed_precision(self) -> str:
        return self.precision.name

    @property
    def distributed_type(self) -> DistributedType | str:
        """How the processes share the work: ``DistributedType.NO``, ``MULTI_CPU``, ``MULTI_GPU``, ``FSDP``...

        A ``str`` enum, so it also equals its value (``"MULTI_CPU"``); a registered strategy's own
        ``distributed_type`` outside Accelerate's list is a plain string.
        """
        if "_distributed_type" in self.state._shared_state:  # assigned through AcceleratorState (tests do)
            return self.state.distributed_type
        return as_distributed_type(self.strategy.distributed_type)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.accumulation.steps

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, steps: int) -> None:
        self.accumulation.steps = steps

    @property
    def sync_gradients(self) -> bool:
        """True when the current micro-step ends an accumulation group (the optimizer steps)."""
        return self.accumulation.sync_gradients

    @property
    def optimizer_step_was_skipped(self) -> bool:
        """True when the last optimizer step was skipped (fp16 gradients overflowed)."""
        return any(optimizer.step_was_skipped for optimizer in self._optimizers)

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return getattr(self.precision, "scaler", None)

    # -- prepare --------------------------------------------------------------------------------------
    def prepare(self, *args: Any, device_placement: list[bool] | None = None) -> Any:
        """Wrap models, optimizers, data loaders and schedulers, given in any order.

        Returns them in the order given (one object when one was passed). Whatever the order,
        models are prepared first, then optimizers, then schedulers, then everything else,
        because optimizers refer to models and schedulers to optimizers.
        """
        if self._state_generation != AcceleratorState.generation():
            raise AttributeError("`AcceleratorState` object has no attribute `distributed_type`. This happens if "
                                 "`AcceleratorState._reset_state()` was called and an `Accelerator` or `PartialState` "
                                 "was not reinitialized: create a new Accelerator before preparing objects.")
        if device_placement is None:
            device_placement = [self.device_placement] * len(args)
        elif len(device_placement) != len(args):
            raise ValueError(f"device_placement has {len(device_placement)} entries for {len(args)} objects.")
        result = list(args)
        for rank in range(4):
            for index, obj in enumerate(args):
                if prepare_order(obj) == rank:
                    result[index] = self._prepare_one(obj, device_placement[index])
        return result[0] if len(result) == 1 else tuple(result)

    def _prepare_one(self, obj: Any, placement: bool) -> Any:
        if isinstance(obj, (AcceleratedOptimizer, AcceleratedScheduler, PreparedDataLoader)):
            return obj
        if isinstance(obj, nn.Module):
            return self.prepare_model(obj, device_placement=placement)
        if isinstance(obj, torch.optim.Optimizer):
            return self.prepare_optimizer(obj)
        if is_scheduler(obj):
            return self.prepare_scheduler(obj)
        if isinstance(obj, DataLoader):
            return self.prepare_data_loader(obj, device_placement=placement)
        return obj

    def prepare_model(self, model: nn.Module, device_placement: bool | None = None,
                      evaluation_mode: bool = False) -> nn.Module:
        """Convert the model for the precision policy, then let the strategy place and wrap it.

        ``evaluation_mode=True``: for a model that is only evaluated, the precision policy and the
        device only (and compiling, where set up): no strategy wrapper, and no place in ``save_state``.
        """
        if any(model is known for known in self._models):
            return model
        model = self.precision.convert_module(model)
        if self.precision.is_mixed and not hasattr(model, "_original_forward"):
            # The instance's own forward runs under the policy's autocast; unwrap_model can take it off again.
            vars(model)["_original_forward"] = model.forward
            vars(model)["forward"] = self.precision.wrap_forward(model.forward)
        placement = self.device_placement if device_placement is None else device_placement
        if evaluation_mode:
            model = model.to(self.device) if placement else model
            self.dynamo_plugin.compile(model)
            return model
        wrapped = self.strategy.setup_module(model) if placement else model
        self.dynamo_plugin.compile(wrapped)  # in place: the state dict keeps its keys
        self._models.append(wrapped)
        return wrapped

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, device_placement: bool | None = None
                          ) -> AcceleratedOptimizer:
        """Wrap an optimizer for the strategy, precision and accumulation. Its state lives where its parameters
        do, so ``device_placement`` (Accelerate's, for moving loaded state) changes nothing."""
        optimizer = wrappers.check_optimizer_parameters(self.strategy.setup_optimizer(optimizer), self._models, self._optimizers)
        prepared = AcceleratedOptimizer(optimizer, self.strategy, self.precision, self.accumulation,
                                        self._finalize_gradients)
        self._optimizers.append(prepared)
        return prepared

    def prepare_scheduler(self, scheduler: Any, steps_per_update: int | None = None) -> AcceleratedScheduler:
        """Wrap an LR scheduler: it steps with the optimizer steps that really happen.

        Each optimizer step advances it ``steps_per_update`` times: by default once per data shard
        (the processes that read different data), as Accelerate does, so a schedule sized from the
        unprepared loader ends with the data; once with ``split_batches`` (the batch is global).
        """
        scheduler = self.strategy.setup_scheduler(scheduler, self.split_batches)
        owners = [opt for opt in self._optimizers if opt.optimizer is getattr(scheduler, "optimizer", None)]
        if steps_per_update is None:
            shards = (self.strategy.distributed_sampler_kwargs or {}).get("num_replicas", 1)
            steps_per_update = 1 if self.split_batches else shards
        prepared = AcceleratedScheduler(scheduler, owners or list(self._optimizers), self.accumulation,
                                        step_with_optimizer=self.step_scheduler_with_optimizer,
                                        steps_per_update=steps_per_update)
        self._schedulers.append(prepared)
        return prepared

    def prepare_data_loader(self, data_loader: DataLoader, device_placement: bool | None = None,
                            slice_fn_for_dispatch: Callable[..., Any] | None = None,
                            register: bool = True) -> PreparedDataLoader:
        """Wrap a DataLoader; ``register=False`` leaves it out of ``save_state`` (a one-off loader).

        ``slice_fn_for_dispatch(batch, slice, process_index=..., num_processes=...)``: with ``dispatch_batches``,
        how each process's part of a batch is cut (default: every tensor along its first dimension).
        """
        placement = self.device_placement if device_placement is None else device_placement
        shard = self.strategy.distributed_sampler_kwargs
        sharding = None if shard is None else Sharding(**shard, even_batches=self.even_batches,
                                                       split_batches=self.split_batches,
                                                       dispatch_batches=bool(self.dataloader_config.dispatch_batches),
                                                       slice_fn=slice_fn_for_dispatch)
        prepared = PreparedDataLoader(data_loader, self.device if placement else None, self.accumulation,
                                      sharding=sharding, agree=self.strategy.broadcast_object,
                                      seed=self.dataloader_config.data_seed, non_blocking=self.dataloader_config.non_blocking)
        if register:
            self._dataloaders.append(prepared)
            batch = data_loader.batch_size
            if batch is not None and sharding is not None and self.split_batches:
                batch //= self.num_processes
            self.strategy.observe_batch_size(batch)
        return prepared

    def unwrap_model(self, model: nn.Module, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True) -> nn.Module:
        """The user's module, without the strategy's wrapper or a ``DataParallel``/DDP of the user's own (and, if
        asked, without autocast). A ``torch.compile``-d model stays compiled around the unwrapped module unless
        ``keep_torch_compile=False``."""
        def unwrap(module: nn.Module) -> nn.Module:
            inner = strip_parallel_wrappers(self.strategy.unwrap_module(module))
            if not keep_fp32_wrapper and "_original_forward" in inner.__dict__:
                inner.forward = inner.__dict__.pop("_original_forward")
                if inner.forward == type(inner).forward.__get__(inner):
                    del inner.forward
            return inner

        return unwrap_inside_compile(model, unwrap, keep_torch_compile)

    def verify_device_map(self, model: nn.Module) -> bool:
        """Whether ``model`` (or a module in it) was dispatched over several devices with a device map
        (``hf_device_map`` with more than one entry): such a model is for inference, not for ``prepare``."""
        return any(len(getattr(module, "hf_device_map", None) or {}) > 1 for module in model.modules())

    # -- the training step ------------------------------------------------------------------------------
    def accumulate(self, *models: nn.Module) -> AbstractContextManager[None]:
        """One micro-step: gradients synchronise and the optimizer steps only at group boundaries."""
        step = self._micro_step
        if step is None or step.models != models:
            step = self._micro_step = MicroStep(self.accumulation, self.strategy, models)
        return step

    def backward(self, loss: torch.Tensor, num_tokens: Any = None, **kwargs: Any) -> None:
        """``loss.backward()``, divided for accumulation and scaled for fp16, exactly once.

        A loss that ``forward_backward`` returned has had its backward: it is left alone. With a LOMO
        optimizer prepared, ``learning_rate=`` makes it ``lomo_backward`` (backward and update in one pass).
        """
        if loss is self._differentiated:
            return
        wrappers.check_loss_has_graph(loss)
        loss = self.accumulation.scale_loss(loss, num_tokens)
        if kwargs and kwargs.get("learning_rate") is not None and self._lomo_optimizers():
            self.lomo_backward(loss, kwargs["learning_rate"])  # as Accelerate routes backward(loss, learning_rate=)
            return
        if self._plain_backward:
            loss.backward(**kwargs)
            return
        loss = self.precision.scale_loss(loss)
        self.strategy.backward(loss, self._models[0] if len(self._models) == 1 else None, **kwargs)

    def _lomo_optimizers(self) -> list[Any]:
        """The prepared optimizers that update in backward (LOMO and AdaLomo have ``fused_backward``)."""
        return [prepared.optimizer for prepared in self._optimizers if hasattr(prepared.optimizer, "fused_backward")]

    def lomo_backward(self, loss: torch.Tensor, learning_rate: float) -> None:
        """Backward and the update in one pass, for a prepared LOMO or AdaLomo optimizer (``pip install lomo-optim``):
        its ``fused_backward(loss, learning_rate)``, which updates each parameter as its gradient is ready."""
        fused = self._lomo_optimizers()
        if len(fused) != 1:
            raise ValueError(f"lomo_backward needs exactly one prepared LOMO optimizer (lomo_optim.Lomo or AdaLomo, "
                             f"pip install lomo-optim); {len(fused)} of the {len(self._optimizers)} prepared "
                             "optimizer(s) are. With another optimizer, call accelerator.backward(loss).")
        if learning_rate is None:
            raise ValueError("lomo_backward(loss, learning_rate): give the learning rate of this step.")
        fused[0].fused_backward(loss, learning_rate)

    def forward_backward(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], *args: Any, target: Any = None,
                         **kwargs: Any) -> torch.Tensor:
        """Run ``loss_fn(model(*args, **kwargs), target)`` and its backward; return the loss, detached.

        The step written this way runs on every layout, pipeline stages (``pp_size > 1``) included:
        there the batch is cut into micro-batches that a schedule passes through the stages, forward
        and backward interleaved, and the loss returned is their mean, on every process. With pipeline
        stages, ``loss_fn`` receives the last stage's output as the traced graph gives it (a
        transformers model's logits tensor, not its output object).
        """
        pipelined = getattr(model, "forward_backward", None)
        if pipelined is not None:
            loss = pipelined(loss_fn, args, kwargs, target,
                             lambda micro: self.precision.scale_loss(self.accumulation.scale_loss(micro)))
        else:
            loss = loss_fn(model(*args, **kwargs), target)
            self.backward(loss)
            loss = loss.detach()
        self._differentiated = loss
        return loss

    def autocast(self, **kwargs: Any) -> Any:
        """The precision policy's autocast, for code outside the prepared model's forward."""
        return self.precision.autocast(**kwargs)

    def _finalize_gradients(self) -> None:
        """At a boundary: the accumulation policy's last division, once, before clipping or stepping."""
        if not self.accumulation.needs_finalize:
            return
        total_tokens = None
        if self.accumulation.normalize == "tokens":
            tokens = torch.as_tensor(self.accumulation.pending_tokens, dtype=torch.float64, device=self.device)
            # Strategies average gradients over processes, so divide by the mean token count.
            total_tokens = float(self.strategy.all_reduce(tokens)) / self.num_processes
        params = (p for opt in self._optimizers for group in opt.param_groups for p in group["params"])
        self.accumulation.finalize_gradients(params, total_tokens)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Undo the fp16 loss scale on the gradients (before clipping or inspecting them)."""
        targets = [optimizer] if optimizer is not None else self._optimizers
        for opt in targets:
            self.precision.unscale_gradients(getattr(opt, "optimizer", opt))

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor | None:
        """Clip the total gradient norm; returns the norm before clipping.

        Only at accumulation boundaries: mid-group gradients are partial sums, and clipping them
        would change the accumulated result. Returns None on other micro-steps.
        """
        if not self.sync_gradients:
            return None
        self._finalize_gradients()
        self.unscale_gradients()
        return self.strategy.clip_grad_norm_(list(parameters), max_norm, norm_type)

    def clip_grad_value_(self, parameters: Any, clip_value: float) -> None:
        """Clamp every gradient to [-clip_value, clip_value] (at accumulation boundaries only)."""
        if not self.sync_gradients:
            return
        self._finalize_gradients()
        self.unscale_gradients()
        self.strategy.clip_grad_value_(list(parameters), clip_value)

    # -- collectives --------------------------------------------------------------------------------------
    def gather(self, tensor: Any) -> Any:
        """Every process's tensors, concatenated along dim 0 (nested structures keep their shape)."""
        return operations.gather(tensor, self.strategy)

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        """``gather``, then drop the samples that even sharding duplicated in the last batch."""
        if use_gather_object or not operations.only_tensors(input_data):
            data = operations.gather_object(input_data, self.strategy)
        else:
            data = operations.gather(input_data, self.strategy)
        loader = self.accumulation.active_dataloader
        remainder = getattr(loader, "remainder", -1) if loader is not None and loader.end_of_dataloader else -1
        if remainder is None or remainder < 0:
            return data
        if isinstance(data, list):
            return data[:remainder]
        return operations.recursively_apply(lambda t: t[:remainder], data)

    def reduce(self, tensor: Any, reduction: str = "sum", scale: float = 1.0) -> Any:
        return operations.reduce(tensor, self.strategy, reduction, scale)

    def pad_across_processes(self, tensor: Any, dim: int = 0, pad_index: int = 0, pad_first: bool = False) -> Any:
        return operations.pad_across_processes(tensor, self.strategy, dim, pad_index, pad_first)

    # -- data -------------------------------------------------------------------------------------------------
    def skip_first_batches(self, dataloader: Any, num_batches: int = 0) -> SkipFirstBatches:
        """One pass of ``dataloader`` that starts ``num_batches`` in (resuming mid-epoch).

        The skipped batches are not loaded: the index sampler skips them. The pass belongs to the
        loader's current epoch, so the next ``for batch in dataloader`` is the following epoch.
        """
        return skip_first_batches(dataloader, num_batches)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def register_for_checkpointing(self, *objects: Any) -> None:
        """Save and restore these objects (anything with ``state_dict``/``load_state_dict``) with the state."""
        for obj in objects:
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(
                    f"register_for_checkpointing: {type(obj).__name__} has no state_dict()/load_state_dict(); "
                    "only such objects can be saved."
                )
            self._custom_objects.append(obj)

    def save_state(self, output_dir: str | os.PathLike | None = None, safe_serialization: bool = True,
                   before_commit: Callable[[Path], None] | None = None, blocking: bool = True,
                   after_commit: Callable[[Path], None] | None = None) -> Path:
        """Write models, optimizers, schedulers, data loader positions, scaler and RNG states.

        Tensors go to safetensors, the rest to JSON, whatever ``safe_serialization`` says (it is
        accepted for Accelerate's scripts; no state is ever pickled). The directory is replaced atomically.
        With no ``output_dir``, writes ``project_dir/checkpoints/checkpoint_<n>``.
        ``before_commit(scratch_dir)`` may add files before the directory is put in place;
        ``after_commit(path)`` runs on every process once it is in place.

        ``blocking=False`` returns once the state is copied: a background thread writes it while
        training goes on. The next save, ``load_state``, ``wait_for_checkpoint`` and
        ``end_training`` wait for it and raise its error; until it is in place the previous
        checkpoint stays where it was.
        """
        project = self.project_configuration
        target = checkpointing.save_target(project, output_dir, self.save_iteration)
        prune = project.automatic_checkpoint_naming and project.total_limit is not None and self.is_main_process

        def committed(path: Path) -> None:
            if prune:  # after the new one is safely in place
                checkpointing.prune_checkpoints(path.parent, cast(int, project.total_limit))
            if after_commit is not None:
                after_commit(path)

        checkpointing.save_accelerator_state(self, target, before_commit, committed, blocking=blocking)
        self.save_iteration += 1
        if blocking:
            self.wait_for_everyone()
        return target

    def register_save_state_pre_hook(self, hook: SaveHook) -> RemovableHandle:
        """Call ``hook(models, weights, output_dir)`` in ``save_state`` before the weights are written.

        It may write files of its own into ``output_dir`` (the folder that becomes the checkpoint)
        and remove from ``weights`` those it saved itself; see ``trainer.checkpoint_hooks``.
        Returns a handle whose ``remove()`` unregisters it.
        """
        return StateHooks.register(self._state_hooks.save, hook, "save")

    def register_load_state_pre_hook(self, hook: LoadHook) -> RemovableHandle:
        """Call ``hook(models, input_dir)`` in ``load_state`` before the weights are read.

        It may load models itself and remove them from ``models``; the rest are loaded from the
        checkpoint's model files in order. Returns a handle whose ``remove()`` unregisters it.
        """
        return StateHooks.register(self._state_hooks.load, hook, "load")

    def wait_for_checkpoint(self) -> None:
        """Block until the asynchronous save in progress (``save_state(blocking=False)``) is in place; raise its error."""
        self.checkpoint_writer.wait()

    @property
    def staging_buffers(self) -> StagingBuffers:
        """Where asynchronous saves copy the state (kept for the next save; pinned with an accelerator)."""
        if self._staging is None:
            self._staging = StagingBuffers(pin=self.device.type == "cuda")
        return self._staging

    def load_state(self, input_dir: str | os.PathLike | None = None, load_kwargs: dict[str, Any] | None = None,
                   strict: bool = True, verify: bool = True, map_location: Any = None) -> Path:
        """Restore what ``save_state`` wrote (checked against its manifest unless ``verify=False``), RNG states last.

        ``load_kwargs`` and ``map_location`` are accepted for Accelerate's scripts, where they go to
        ``torch.load``: nothing here is unpickled, and every tensor is read straight to where the
        prepared object it belongs to lives.
        """
        self.wait_for_checkpoint()
        source = Path(input_dir) if input_dir is not None else checkpointing.numbered_checkpoint(
            self.project_dir, None, "load_state")
        return checkpointing.load_accelerator_state(self, source, strict=strict, verify=verify)

    def save_model(self, model: nn.Module, save_directory: str | os.PathLike, max_shard_size: int | str = "10GB",
                   safe_serialization: bool = True) -> Path:
        """Write the unwrapped model's weights into ``save_directory``: ``model.safetensors``, or shards of at most
        ``max_shard_size`` (bytes, or ``"10GB"``, ``"500MB"``...) with ``model.safetensors.index.json``.

        ``safe_serialization=False`` writes ``pytorch_model.bin`` (pickle) instead, as Accelerate does.
        Returns the file a loader is given: the single file or the index (see ``trainer.model_files``).
        Under a strategy that shards the weights every process must call it (they gather the weights
        together); otherwise the main process may call it alone, as ``if accelerator.is_main_process:``
        scripts do.
        """
        directory = Path(save_directory)
        shard_size_bytes(max_shard_size)  # a bad size fails before any work
        collective = not writes_whole_weights(self.strategy)
        if self.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
        if collective:
            self.wait_for_everyone()
        path = write_model_files(self.strategy, model, directory, max_shard_size, safe_serialization)
        if collective:
            self.wait_for_everyone()
        return path

    def save(self, obj: Any, f: str | os.PathLike, safe_serialization: bool = False) -> None:
        """Save ``obj`` once, from the main process (``torch.save``; safetensors for a dict of tensors if asked)."""
        save(obj, f, save_on_each_node=self.project_configuration.save_on_each_node,
             safe_serialization=safe_serialization)

    def get_state_dict(self, model: nn.Module, unwrap: bool = True) -> dict[str, torch.Tensor]:
        """The model's whole weights by name; a sharding strategy gathers them (onto the main process) first.

        Call it on every process. ``unwrap=False`` gives the prepared wrapper's own ``state_dict()``.
        """
        if not unwrap:
            return model.state_dict()
        return self.strategy.full_state_dict(model)

    # -- end ------------------------------------------------------------------------------------------------
    def end_training(self) -> None:
        """Finish the trackers, wait for every process, and close the process group.

        Closing the group explicitly, rather than leaving it to interpreter shutdown, lets its
        threads stop in order before the process exits. An asynchronous save still being written
        is finished first.
        """
        try:
            self.checkpoint_writer.close()
        finally:
            for tracker in self.trackers:
                tracker.finish()
            self.wait_for_everyone()
            self.strategy.teardown()  # engines and their hooks go while the group they use still exists
            self.state.destroy_process_group()

    # -- memory ----------------------------------------------------------------------------------------------------
    def free_memory(self, *objects: Any) -> list[None]:
        """Drop every reference the Accelerator holds, collect garbage and empty the device cache.

        Returns one None per object passed, so ``model, optimizer = accelerator.free_memory(model,
        optimizer)`` also releases the caller's references.
        """
        self._models.clear()
        self._optimizers.clear()
        self._schedulers.clear()
        self._dataloaders.clear()
        self._custom_objects.clear()
        gc.collect()
        empty_cache()
        return [None] * len(objects)

    clear = free_memory
