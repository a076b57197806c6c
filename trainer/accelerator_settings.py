"""What the Accelerator's grouped arguments mean: kwargs handlers, plugins and configurations, sorted to their owners.

Scripts written for Accelerate configure a run with objects (``kwargs_handlers=[...]``,
``fsdp_plugin=``, ``dataloader_config=``, ``project_config=``...). This module reads them once,
before any work, and hands each field to the part that owns it: strategy options, the precision
policy's scaler and autocast arguments, the process group's backend and timeout, the data loaders'
sharding, the project's folders. Two objects that set the same thing, or an object of the wrong
kind, are one clear error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from trainer import launch_environment as variables
from trainer.accumulation import GradientAccumulation
from trainer.strategies import Strategy, registry
from trainer.utils.configurations import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration
from trainer.utils.dynamo import TorchDynamoPlugin
from trainer.utils.kwargs_handlers import (
    AutocastKwargs,
    DistributedDataParallelKwargs,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    KwargsHandler,
    ProfileKwargs,
)
from trainer.utils.plugins import DeepSpeedPlugin, FullyShardedDataParallelPlugin, MegatronLMPlugin, StrategyPlugin

HANDLERS = (AutocastKwargs, DistributedDataParallelKwargs, GradScalerKwargs, InitProcessGroupKwargs, ProfileKwargs)


@dataclass
class Settings:
    """The Accelerator's settings after its grouped arguments were sorted to their owners."""

    strategy: str | Strategy | None = None
    strategy_arguments: dict[str, dict[str, Any]] = field(default_factory=dict)  # by strategy name
    state: dict[str, Any] = field(default_factory=dict)  # PartialState's backend and timeout
    scaler: dict[str, Any] = field(default_factory=dict)  # the fp16 GradScaler's arguments
    autocast: dict[str, Any] = field(default_factory=dict)  # torch.autocast's arguments
    accumulation: GradientAccumulation = field(default_factory=GradientAccumulation)
    loader: DataLoaderConfiguration = field(default_factory=DataLoaderConfiguration)
    project: ProjectConfiguration = field(default_factory=ProjectConfiguration)
    profile: ProfileKwargs | None = None  # accelerator.profile()'s default settings
    dynamo: TorchDynamoPlugin = field(default_factory=TorchDynamoPlugin)  # torch.compile for prepared models


def settle(*, strategy: str | Strategy | None, kwargs_handlers: Iterable[KwargsHandler] | None,
           fsdp_plugin: FullyShardedDataParallelPlugin | None, deepspeed_plugin: Any,
           megatron_lm_plugin: MegatronLMPlugin | None, gradient_accumulation_steps: int | None,
           gradient_accumulation_plugin: Any, accumulation_normalize: str,
           dataloader_config: DataLoaderConfiguration | None, split_batches: bool | None, even_batches: bool | None,
           project_config: ProjectConfiguration | None, project_dir: str | os.PathLike | None,
           dynamo_backend: Any = None, dynamo_plugin: TorchDynamoPlugin | None = None, deepspeed_plugins: Any = None,
           rng_types: Any = None, torch_tp_plugin: Any = None, parallelism_config: Any = None) -> Settings:
    """Sort the grouped arguments; raise on conflicts, before any process group or device is touched.

    What ``trainer launch`` handed over (the strategy, the accumulation steps) applies where the
    arguments leave it open.
    """
    settings = Settings(strategy=strategy or os.environ.get(variables.STRATEGY))
    _handlers(settings, kwargs_handlers)
    if deepspeed_plugins is not None:
        if deepspeed_plugin is not None:
            raise ValueError("deepspeed_plugin= and deepspeed_plugins= were both given: they are one argument; give one.")
        deepspeed_plugin = deepspeed_plugins
    if torch_tp_plugin is not None:
        raise ValueError("torch_tp_plugin= is not available: give the tensor-parallel size as "
                         "parallelism_config=ParallelismConfig(tp_size=...).")
    _check_rng_types(rng_types)
    _plugins(settings, fsdp_plugin, _one_deepspeed_plugin(deepspeed_plugin), megatron_lm_plugin)
    if parallelism_config is None and os.environ.get(variables.PARALLELISM):  # the launch's parallelism_config
        from trainer.parallelism import ParallelismConfig

        parallelism_config = ParallelismConfig(**json.loads(os.environ[variables.PARALLELISM]))
    if parallelism_config is not None:
        _parallelism(settings, parallelism_config)
    settings.accumulation = _accumulation(gradient_accumulation_steps, gradient_accumulation_plugin, accumulation_normalize)
    if dynamo_plugin is not None and dynamo_backend is not None:
        raise ValueError("dynamo_backend= and dynamo_plugin= were both given: set the backend in the TorchDynamoPlugin.")
    if dynamo_plugin is not None and not isinstance(dynamo_plugin, TorchDynamoPlugin):
        raise TypeError(f"dynamo_plugin= takes a TorchDynamoPlugin, got {type(dynamo_plugin).__name__}.")
    settings.dynamo = dynamo_plugin or TorchDynamoPlugin(backend=dynamo_backend)
    if dataloader_config is not None:
        if not isinstance(dataloader_config, DataLoaderConfiguration):
            raise TypeError(f"dataloader_config= takes a DataLoaderConfiguration, got {type(dataloader_config).__name__}.")
        if split_batches is not None or even_batches is not None:
            raise ValueError("dataloader_config= and split_batches=/even_batches= were both given: set them in the "
                             "DataLoaderConfiguration.")
        settings.loader = dataloader_config
    else:
        settings.loader = DataLoaderConfiguration(split_batches=bool(split_batches),
                                                  even_batches=True if even_batches is None else even_batches)
    if project_config is not None:
        if not isinstance(project_config, ProjectConfiguration):
            raise TypeError(f"project_config= takes a ProjectConfiguration, got {type(project_config).__name__}.")
        if project_dir is not None and project_config.project_dir is not None and \
                os.fspath(project_dir) != os.fspath(project_config.project_dir):
            raise ValueError(f"project_dir={os.fspath(project_dir)!r} and project_config.project_dir="
                             f"{os.fspath(project_config.project_dir)!r} disagree: give one of them.")
        if project_config.project_dir is None and project_dir is not None:
            project_config.set_directories(project_dir)
        settings.project = project_config
    elif project_dir is not None:
        settings.project = ProjectConfiguration(project_dir=project_dir)
    return settings


def _accumulation(steps: int | None, plugin: Any, normalize: str) -> GradientAccumulation:
    if plugin is not None and steps is not None:
        raise ValueError("gradient_accumulation_steps= and gradient_accumulation_plugin= were both given: give one.")
    if isinstance(plugin, GradientAccumulation):
        return plugin
    if isinstance(plugin, GradientAccumulationPlugin):
        return GradientAccumulation(normalize=normalize, **plugin.policy_arguments())
    if plugin is not None:
        raise TypeError(f"gradient_accumulation_plugin= takes a GradientAccumulationPlugin, got {type(plugin).__name__}.")
    return GradientAccumulation(steps if steps is not None else int(os.environ.get(variables.ACCUMULATION, "1")),
                                normalize=normalize)


def _handlers(settings: Settings, handlers: Iterable[KwargsHandler] | None) -> None:
    seen: dict[type, KwargsHandler] = {}
    for handler in handlers or ():
        kind = next((cls for cls in HANDLERS if isinstance(handler, cls)), None)
        if kind is None:
            known = ", ".join(cls.__name__ for cls in HANDLERS)
            raise TypeError(f"kwargs_handlers= takes {known}; got {type(handler).__name__}.")
        if kind in seen:
            raise ValueError(f"kwargs_handlers= holds two {kind.__name__} objects: give one.")
        seen[kind] = handler
    if DistributedDataParallelKwargs in seen:
        ddp = seen[DistributedDataParallelKwargs]
        assert isinstance(ddp, DistributedDataParallelKwargs)
        ddp_class = registry.strategy_class("ddp")
        arguments = ddp.strategy_arguments()
        ddp_class(**arguments)  # the constructor's checks run now, on any number of processes, before any work
        settings.strategy_arguments[ddp_class.spec.name] = arguments
    if GradScalerKwargs in seen:
        settings.scaler = seen[GradScalerKwargs].to_kwargs()
    if AutocastKwargs in seen:
        settings.autocast = {k: v for k, v in seen[AutocastKwargs].to_dict().items() if v is not None}
    if ProfileKwargs in seen:
        settings.profile = cast(ProfileKwargs, seen[ProfileKwargs])
    if InitProcessGroupKwargs in seen:
        init = seen[InitProcessGroupKwargs]
        assert isinstance(init, InitProcessGroupKwargs)
        settings.state = init.state_arguments()


RNG_TYPES = ("torch", "cuda", "mlu", "sdaa", "musa", "npu", "xla", "xpu", "hpu", "generator")


def _check_rng_types(rng_types: Any) -> None:
    """Accelerate syncs these random states at each epoch; seeded shuffling makes that unnecessary, names are checked."""
    for rng_type in rng_types or ():
        name = str(getattr(rng_type, "value", rng_type))
        if name not in RNG_TYPES:
            raise ValueError(f"rng_types=[{name!r}]: not a random number generator type; use {', '.join(RNG_TYPES)}.")


def _one_deepspeed_plugin(plugin: Any) -> DeepSpeedPlugin | None:
    """``deepspeed_plugin=`` takes one plugin; a dict of them (several models, one engine each) is not available."""
    if isinstance(plugin, Mapping):
        if len(plugin) != 1:
            raise ValueError(f"deepspeed_plugin= got {len(plugin)} plugins ({', '.join(map(str, plugin))}): the DeepSpeed "
                             "strategy trains one model with one engine; give one plugin, and one Accelerator per model.")
        plugin = next(iter(plugin.values()))
    if plugin is not None and not isinstance(plugin, DeepSpeedPlugin):
        raise TypeError(f"deepspeed_plugin= takes a DeepSpeedPlugin, got {type(plugin).__name__}.")
    return plugin


def _parallelism(settings: Settings, config: Any) -> None:
    """An N-D layout runs on the FSDP strategy: fully_shard over the data-parallel dimensions, tensor parallelism inside."""
    from trainer.parallelism import ParallelismConfig

    if not isinstance(config, ParallelismConfig):
        raise TypeError(f"parallelism_config= takes a ParallelismConfig(dp_replicate_size=..., dp_shard_size=..., "
                        f"tp_size=...), not a {type(config).__name__}.")
    chosen = settings.strategy
    if isinstance(chosen, Strategy) or (chosen is not None and registry.canonical_name(chosen) not in ("auto", "fsdp")):
        name = type(chosen).__name__ if isinstance(chosen, Strategy) else repr(chosen)
        raise ValueError(f"parallelism_config= lays out FSDP's data-parallel and tensor-parallel dimensions, and the "
                         f"strategy is {name}: leave strategy= out (or use 'fsdp' with the FSDP options in fsdp_plugin).")
    settings.strategy = "fsdp"
    settings.strategy_arguments.setdefault("fsdp", {})["parallelism"] = config


def _plugins(settings: Settings, *plugins: StrategyPlugin | None) -> None:
    given = [plugin for plugin in plugins if plugin is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(type(p).__name__ for p in given)} were both given: a run has one strategy.")
    if not given:
        return
    plugin = given[0]
    name = plugin.strategy
    chosen = settings.strategy
    if isinstance(chosen, Strategy):
        raise ValueError(f"strategy={type(chosen).__name__}(...) and {type(plugin).__name__} were both given: pass the "
                         "options to the strategy object, or give only the plugin.")
    if chosen is not None and registry.canonical_name(chosen) not in ("auto", name):
        raise ValueError(f"{type(plugin).__name__} selects strategy {name!r}, but the run is set to {chosen!r} (by "
                         "strategy= or trainer launch): make them agree.")
    settings.strategy = name
    settings.strategy_arguments[name] = plugin.strategy_arguments()
