"""``FullyShardedDataParallelPlugin``, ``DeepSpeedPlugin``, ``MegatronLMPlugin``: Accelerate's plugins, as strategy options.

A plugin passed to ``Accelerator(fsdp_plugin=...)`` (or ``deepspeed_plugin=``, ``megatron_lm_plugin=``)
selects that strategy, and each field it sets becomes one of the strategy's options: the field's
launch-configuration key is looked up in the strategy's ``spec``, so its value is checked as the
YAML key would be and reaches the constructor argument that key sets. Fields left unset (None)
leave the strategy's defaults, or what ``trainer launch`` gave it. A field with no equivalent here
is one error naming it and what to do instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from trainer.precision.names import precision_dtype
from trainer.strategies import registry


class StrategyPlugin:
    """Base of the plugins: ``strategy_arguments()`` maps the fields that were set onto the strategy's options."""

    strategy: ClassVar[str]  # the strategy's name in the registry
    # field -> the strategy's launch-configuration key (checked and mapped through its spec), for fields named differently
    keys: ClassVar[dict[str, str]] = {}
    key_prefix: ClassVar[str] = ""  # the key of a field not in ``keys``: prefix + field name
    arguments: ClassVar[dict[str, str]] = {}  # field -> constructor argument (checked by the constructor), no YAML key
    no_effect: ClassVar[tuple[str, ...]] = ()  # fields accepted for scripts written for Accelerate, with no effect here
    unsupported: ClassVar[dict[str, str]] = {}  # field -> why it cannot be honoured here (an error when set)

    def convert(self, name: str, value: Any) -> Any:
        """The field's value as the strategy's option takes it (subclasses convert torch enums, lower case...)."""
        return value

    def field_names(self) -> list[str]:
        """The plugin's fields, in order (a dataclass's by default)."""
        return [item.name for item in fields(self)]  # type: ignore[arg-type]

    def strategy_arguments(self) -> dict[str, Any]:
        """The strategy's constructor arguments that the fields set here give."""
        spec = registry.strategy_class(self.strategy).spec
        result: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            if value is None or name in self.no_effect:
                continue
            if name in self.unsupported:
                raise ValueError(f"{type(self).__name__}({name}={value!r}): {self.unsupported[name]}")
            value = self.convert(name, value)
            if name in self.arguments:
                result[self.arguments[name]] = value
                continue
            option = spec.option(self.keys.get(name, self.key_prefix + name))
            if not callable(value):  # a callable (a wrap policy) is checked by the constructor
                option.check(value, f"{type(self).__name__}({name}=...)")
            assert option.argument is not None  # a key without an argument would be listed in no_effect
            result[option.argument] = value
        return result


def _name_of(value: Any) -> Any:
    """A torch enum member (``ShardingStrategy.FULL_SHARD``) as its name; strings in upper case."""
    if hasattr(value, "name") and not isinstance(value, str):
        return value.name
    return value.upper() if isinstance(value, str) else value


@dataclass
class FullyShardedDataParallelPlugin(StrategyPlugin):
    """Fully sharded data parallel training (the FSDP strategy, on ``fully_shard``).

    Args:
        fsdp_version: 1 or 2; accepted, with no effect (``fully_shard`` is FSDP 2).
        sharding_strategy: ``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ``"NO_SHARD"``, ``"HYBRID_SHARD"``,
            ``"HYBRID_SHARD_ZERO2"``, their numbers 1-5, or torch's ``ShardingStrategy`` member.
        reshard_after_forward: free the gathered parameters after forward (a bool); a sharding
            strategy name sets ``sharding_strategy``.
        backward_prefetch: ``"BACKWARD_PRE"``, ``"BACKWARD_POST"``, ``"NO_PREFETCH"`` (or torch's member).
        mixed_precision_policy: the units' parameter dtype: a precision name (``"bf16"``), a dict
            with ``param_dtype`` (and ``reduce_dtype`` fp32), or torch's ``MixedPrecisionPolicy``/``MixedPrecision``.
        auto_wrap_policy: ``"transformer_based_wrap"``, ``"size_based_wrap"``, ``"no_wrap"``, a callable
            ``policy(module) -> bool``, or a torch wrap policy ``policy(module, recurse, nonwrapped_numel)``.
        cpu_offload: keep sharded parameters on the CPU (a bool, or torch's ``CPUOffload``/``CPUOffloadPolicy``).
        ignored_modules: not available (every module is sharded).
        state_dict_type: ``"FULL_STATE_DICT"``, ``"SHARDED_STATE_DICT"`` or ``"LOCAL_STATE_DICT"``, any case.
        state_dict_config: torch's ``FullStateDictConfig`` or ``ShardedStateDictConfig``: sets
            ``state_dict_type`` (they must agree when both are given). Its ``offload_to_cpu`` and
            ``rank0_only`` have no effect: full state dicts are gathered to the CPU of every process.
        optim_state_dict_config: the optimizer's (``FullOptimStateDictConfig``...): must agree with it.
        limit_all_gathers: accepted, with no effect (FSDP 1's rate limiter).
        use_orig_params: accepted, with no effect (``fully_shard`` keeps the original parameters).
        param_init_fn: not available: build on the meta device and use ``cpu_ram_efficient_loading``.
        sync_module_states: start every process from process 0's weights.
        forward_prefetch: gather the next unit's parameters during forward.
        activation_checkpointing: recompute each unit's activations in backward.
        cpu_ram_efficient_loading: only process 0 holds the real weights.
        transformer_cls_names_to_wrap: class names of the layers ``transformer_based_wrap`` wraps.
        min_num_params: the parameter threshold of ``size_based_wrap``.
    """

    fsdp_version: int | None = None
    sharding_strategy: Any = None
    reshard_after_forward: Any = None
    backward_prefetch: Any = None
    mixed_precision_policy: Any = None
    auto_wrap_policy: Any = None
    cpu_offload: Any = None
    ignored_modules: Any = None
    state_dict_type: Any = None
    state_dict_config: Any = None
    optim_state_dict_config: Any = None
    limit_all_gathers: bool | None = None
    use_orig_params: bool | None = None
    param_init_fn: Callable[[nn.Module], None] | None = None
    sync_module_states: bool | None = None
    forward_prefetch: bool | None = None
    activation_checkpointing: bool | None = None
    cpu_ram_efficient_loading: bool | None = None
    transformer_cls_names_to_wrap: Any = None
    min_num_params: int | None = None

    strategy: ClassVar[str] = "fsdp"
    key_prefix: ClassVar[str] = "fsdp_"
    keys: ClassVar[dict[str, str]] = {"cpu_offload": "fsdp_offload_params",
                                      "transformer_cls_names_to_wrap": "fsdp_transformer_layer_cls_to_wrap"}
    arguments: ClassVar[dict[str, str]] = {"mixed_precision_policy": "mixed_precision"}
    no_effect: ClassVar[tuple[str, ...]] = ("fsdp_version", "limit_all_gathers", "use_orig_params", "state_dict_config",
                                            "optim_state_dict_config")  # the last two: by strategy_arguments
    unsupported: ClassVar[dict[str, str]] = {
        "ignored_modules": "fully_shard shards every module here; leave the modules out of the model, or freeze them.",
        "param_init_fn": "build the model on the meta device where process_index != 0 and set "
                         "cpu_ram_efficient_loading=True: process 0's weights are sent to the others.",
    }

    def strategy_arguments(self) -> dict[str, Any]:
        kinds = {name: _state_dict_kind(name, getattr(self, name))
                 for name in ("state_dict_config", "optim_state_dict_config") if getattr(self, name) is not None}
        given = _name_of(self.state_dict_type) if self.state_dict_type is not None else None
        for name, kind in kinds.items():
            if (given or kind) != kind:
                raise ValueError(f"FullyShardedDataParallelPlugin({name}={type(getattr(self, name)).__name__}(...)) "
                                 f"asks for a {kind} but state_dict_type is {given!r}: make them agree.")
            given = kind
        arguments = super().strategy_arguments()
        if given is not None:
            arguments["state_dict_type"] = given
        return arguments

    def convert(self, name: str, value: Any) -> Any:
        if name in ("sharding_strategy", "backward_prefetch", "state_dict_type"):
            return _name_of(value)
        if name == "reshard_after_forward" and not isinstance(value, bool):
            raise ValueError(f"FullyShardedDataParallelPlugin(reshard_after_forward={value!r}): give True or False; "
                             "a sharding strategy goes in sharding_strategy.")
        if name == "auto_wrap_policy":
            return _wrap_policy(value)
        if name == "cpu_offload":
            return bool(getattr(value, "offload_params", True)) if not isinstance(value, bool) else value
        if name == "mixed_precision_policy":
            return _param_dtype(value)
        return value


def _state_dict_kind(name: str, config: Any) -> str:
    """``FULL_STATE_DICT``/``SHARDED_STATE_DICT``/``LOCAL_STATE_DICT`` from torch's (optimizer) state-dict config."""
    kind = type(config).__name__.replace("Optim", "")
    for prefix, state_dict_type in (("Full", "FULL_STATE_DICT"), ("Sharded", "SHARDED_STATE_DICT"),
                                    ("Local", "LOCAL_STATE_DICT")):
        if kind.startswith(prefix):
            return state_dict_type
    raise ValueError(f"FullyShardedDataParallelPlugin({name}={config!r}): give torch's FullStateDictConfig or "
                     "ShardedStateDictConfig (or their Optim versions), or set state_dict_type instead.")


def _wrap_policy(policy: Any) -> Any:
    if isinstance(policy, str):
        return policy.upper()
    if not callable(policy):
        raise ValueError(f"FullyShardedDataParallelPlugin(auto_wrap_policy={policy!r}): give 'transformer_based_wrap', "
                         "'size_based_wrap', 'no_wrap' or a callable.")
    parameters = inspect.signature(policy).parameters
    if {"recurse", "nonwrapped_numel"} <= set(parameters):  # torch's wrap-policy protocol: ask it for each module alone
        return lambda module: bool(policy(module=module, recurse=False,
                                          nonwrapped_numel=sum(p.numel() for p in module.parameters(recurse=False))))
    return policy


def _param_dtype(policy: Any) -> torch.dtype | None:
    """The units' parameter dtype from any of the forms Accelerate accepts; reductions must stay fp32."""
    if isinstance(policy, str):
        return precision_dtype(policy)
    settings: Mapping[str, Any] = policy if isinstance(policy, Mapping) else vars(policy)
    unknown = set(settings) - {"param_dtype", "reduce_dtype", "buffer_dtype", "output_dtype", "cast_forward_inputs",
                               "keep_low_precision_grads", "cast_root_forward_inputs", "_module_classes_to_ignore"}
    if unknown:
        raise ValueError(f"FullyShardedDataParallelPlugin(mixed_precision_policy=...): unknown settings {sorted(unknown)}.")
    dtypes = {key: _dtype(settings.get(key)) for key in ("param_dtype", "reduce_dtype", "buffer_dtype", "output_dtype")}
    for key in ("reduce_dtype", "buffer_dtype", "output_dtype"):
        if dtypes[key] not in (None, torch.float32):
            raise ValueError(f"FullyShardedDataParallelPlugin(mixed_precision_policy={{{key}: {dtypes[key]}}}): the FSDP "
                             "strategy reduces gradients in fp32 and keeps buffers and outputs as they are; set only "
                             "param_dtype.")
    return dtypes["param_dtype"]


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value), None)
    return found if isinstance(found, torch.dtype) else precision_dtype(str(value))


@dataclass
class DeepSpeedPlugin(StrategyPlugin):
    """A DeepSpeed engine (the DeepSpeed strategy).

    Args:
        hf_ds_config: a DeepSpeed config: a dict, the path of a JSON file, or an object with a ``config`` dict.
        gradient_accumulation_steps: must agree with the Accelerator's.
        gradient_clipping: max gradient norm, clipped by the engine.
        zero_stage: 0-3.
        is_train_batch_min: accepted when True (the default); the batch size comes from the prepared
            training loader.
        offload_optimizer_device: ``"none"``, ``"cpu"`` or ``"nvme"``.
        offload_param_device: ``"none"``, ``"cpu"`` or ``"nvme"`` (ZeRO-3).
        offload_optimizer_nvme_path: where NVMe optimizer offload writes.
        offload_param_nvme_path: where NVMe parameter offload writes.
        zero3_init_flag: build models already partitioned (ZeRO-3).
        zero3_save_16bit_model: under ZeRO-3, ``save_model`` gathers the 16-bit weights.
        transformer_moe_cls_names: not available (no expert-parallel layers here).
        enable_msamp: not available: MS-AMP is not maintained; use ``mixed_precision="fp8"`` (torchao).
        msamp_opt_level: not available (as ``enable_msamp``).
    """

    hf_ds_config: Any = None
    gradient_accumulation_steps: int | None = None
    gradient_clipping: float | None = None
    zero_stage: int | None = None
    is_train_batch_min: bool | None = None
    offload_optimizer_device: str | None = None
    offload_param_device: str | None = None
    offload_optimizer_nvme_path: str | None = None
    offload_param_nvme_path: str | None = None
    zero3_init_flag: bool | None = None
    zero3_save_16bit_model: bool | None = None
    transformer_moe_cls_names: str | None = None
    enable_msamp: bool | None = None
    msamp_opt_level: str | None = None

    strategy: ClassVar[str] = "deepspeed"
    arguments: ClassVar[dict[str, str]] = {"hf_ds_config": "config"}
    no_effect: ClassVar[tuple[str, ...]] = ("is_train_batch_min", "enable_msamp")  # checked first, below
    unsupported: ClassVar[dict[str, str]] = {
        "transformer_moe_cls_names": "the DeepSpeed strategy has no expert-parallel layers; leave it unset.",
        "msamp_opt_level": "MS-AMP is not available; use mixed_precision='fp8' (torchao) instead.",
    }

    def convert(self, name: str, value: Any) -> Any:
        if name == "hf_ds_config" and not isinstance(value, (dict, str)) and hasattr(value, "config"):
            return value.config
        return value

    def bind(self, strategy: Any) -> None:
        """From now on ``deepspeed_config`` is ``strategy``'s resolved config (``AcceleratorState`` calls this)."""
        self.__dict__["_strategy"] = strategy

    @property
    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config: the engine's resolved one once prepared, else what ``hf_ds_config`` holds."""
        strategy = self.__dict__.get("_strategy")
        if strategy is not None:
            return strategy.config
        from trainer.strategies.deepspeed_config import load_config

        return load_config(self.convert("hf_ds_config", self.hf_ds_config))

    def strategy_arguments(self) -> dict[str, Any]:
        if self.is_train_batch_min is False:
            raise ValueError("DeepSpeedPlugin(is_train_batch_min=False): the DeepSpeed batch size is the prepared "
                             "training loader's here; leave is_train_batch_min at True.")
        if self.enable_msamp:
            raise ValueError("DeepSpeedPlugin(enable_msamp=True): MS-AMP is not available; use mixed_precision='fp8' "
                             "(torchao) instead.")
        return super().strategy_arguments()


class MegatronLMPlugin(StrategyPlugin):
    """Tensor parallelism with megatron-core's layers (the Megatron strategy).

    ``tp_degree``, ``pp_degree``, ``num_micro_batches``, ``gradient_clipping``,
    ``sequence_parallelism``, ``recompute_activations`` and ``use_distributed_optimizer`` are the
    strategy's options. Accelerate's other Megatron-LM fields configure Megatron-LM's own training
    loop, datasets and schedulers, which this strategy does not run (it runs the Accelerator's loop
    over megatron-core's parallel layers): each is refused by name.
    """

    strategy: ClassVar[str] = "megatron"
    key_prefix: ClassVar[str] = "megatron_lm_"
    _FIELDS = ("tp_degree", "pp_degree", "num_micro_batches", "gradient_clipping", "sequence_parallelism",
               "recompute_activations", "use_distributed_optimizer")

    def __init__(self, tp_degree: int | None = None, pp_degree: int | None = None, num_micro_batches: int | None = None,
                 gradient_clipping: float | None = None, sequence_parallelism: bool | None = None,
                 recompute_activations: bool | None = None, use_distributed_optimizer: bool | None = None,
                 **others: Any) -> None:
        given = {name: value for name, value in others.items() if value is not None}
        if given:
            raise ValueError(f"MegatronLMPlugin({', '.join(f'{name}=...' for name in sorted(given))}): configures "
                             "Megatron-LM's own training loop, which the Megatron strategy does not run (it runs the "
                             "Accelerator's loop over megatron-core's parallel layers). Its options are "
                             f"{', '.join(self._FIELDS)}.")
        self.tp_degree, self.pp_degree, self.num_micro_batches = tp_degree, pp_degree, num_micro_batches
        self.gradient_clipping, self.sequence_parallelism = gradient_clipping, sequence_parallelism
        self.recompute_activations, self.use_distributed_optimizer = recompute_activations, use_distributed_optimizer

    def field_names(self) -> list[str]:
        return list(self._FIELDS)
