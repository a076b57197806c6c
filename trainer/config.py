"""The launch configuration: the YAML that ``trainer config`` writes and ``trainer launch`` reads.

Files written for Hugging Face Accelerate load unchanged. Every key is checked, nested
sections included: an unknown key is an error with a did-you-mean, a wrong type or value names
the key, the value and what is allowed. The result is handed to the launched processes as
``TRAINER_*`` environment variables, which ``Accelerator()`` / ``Trainer(strategy="auto",
precision="auto")`` read.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIG_ENV = "TRAINER_CONFIG_FILE"
DEFAULT_CONFIG = Path(os.environ.get("TRAINER_HOME", Path.home() / ".cache" / "trainer")) / "default_config.yaml"

DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU", "FSDP",
                     "DEEPSPEED", "MEGATRON_LM", "XLA")
# What each distributed type runs as, by strategy name.
STRATEGY_OF = {"NO": "single_device", "FSDP": "fsdp", "DEEPSPEED": "deepspeed", "MEGATRON_LM": "megatron", "XLA": "xla",
               **{kind: "ddp" for kind in DISTRIBUTED_TYPES if kind.startswith("MULTI_")}}


@dataclass(frozen=True)
class Key:
    """One allowed key: its Python types and, where the values are a fixed set, the set."""

    types: tuple[type, ...]
    choices: tuple[Any, ...] | None = None
    section: dict[str, Key] | None = None  # a nested mapping with keys of its own


BOOL, INT, STR, FLOAT = (bool,), (int,), (str,), (int, float)
OPT_STR, OPT_INT = (str, type(None)), (int, type(None))

FSDP_KEYS = {
    "fsdp_version": Key(INT, (1, 2)),
    "fsdp_auto_wrap_policy": Key(STR, ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")),
    "fsdp_backward_prefetch": Key(STR, ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")),
    "fsdp_backward_prefetch_policy": Key(STR, ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")),
    "fsdp_cpu_ram_efficient_loading": Key(BOOL),
    "fsdp_forward_prefetch": Key(BOOL),
    "fsdp_offload_params": Key(BOOL),
    "fsdp_sharding_strategy": Key((str, int), ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD",
                                               "HYBRID_SHARD_ZERO2", 1, 2, 3, 4, 5)),
    "fsdp_reshard_after_forward": Key((bool, str)),
    "fsdp_state_dict_type": Key(STR, ("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT")),
    "fsdp_sync_module_states": Key(BOOL),
    "fsdp_use_orig_params": Key(BOOL),
    "fsdp_transformer_layer_cls_to_wrap": Key((str, list)),
    "fsdp_min_num_params": Key(INT),
    "fsdp_activation_checkpointing": Key(BOOL),
}
DEEPSPEED_KEYS = {
    "zero_stage": Key(INT, (0, 1, 2, 3)),
    "gradient_accumulation_steps": Key(INT),
    "gradient_clipping": Key(FLOAT),
    "offload_optimizer_device": Key(STR, ("none", "cpu", "nvme")),
    "offload_param_device": Key(STR, ("none", "cpu", "nvme")),
    "offload_optimizer_nvme_path": Key(OPT_STR),
    "offload_param_nvme_path": Key(OPT_STR),
    "zero3_init_flag": Key(BOOL),
    "zero3_save_16bit_model": Key(BOOL),
    "deepspeed_config_file": Key(OPT_STR),
    "deepspeed_hostfile": Key(OPT_STR),
    "deepspeed_multinode_launcher": Key(STR, ("pdsh", "standard", "openmpi", "mvapich", "mpich", "nossh")),
    "deepspeed_inclusion_filter": Key(OPT_STR),
    "deepspeed_exclusion_filter": Key(OPT_STR),
}
MEGATRON_KEYS = {
    "megatron_lm_tp_degree": Key(INT),
    "megatron_lm_pp_degree": Key(INT),
    "megatron_lm_num_micro_batches": Key(INT),
    "megatron_lm_sequence_parallelism": Key(BOOL),
    "megatron_lm_recompute_activations": Key(BOOL),
    "megatron_lm_use_distributed_optimizer": Key(BOOL),
    "megatron_lm_gradient_clipping": Key(FLOAT),
}
DYNAMO_KEYS = {
    "dynamo_backend": Key(STR), "dynamo_mode": Key(STR), "dynamo_use_fullgraph": Key(BOOL),
    "dynamo_use_dynamic": Key(BOOL),
}
TOP_KEYS = {
    "compute_environment": Key(STR, ("LOCAL_MACHINE", "AMAZON_SAGEMAKER")),
    "distributed_type": Key(STR, DISTRIBUTED_TYPES),
    "mixed_precision": Key(STR, ("no", "fp16", "bf16", "fp8")),
    "num_machines": Key(INT),
    "num_processes": Key(INT),
    "machine_rank": Key(INT),
    "main_process_ip": Key(OPT_STR),
    "main_process_port": Key(OPT_INT),
    "main_training_function": Key(STR),
    "rdzv_backend": Key(STR, ("static", "c10d", "etcd", "etcd-v2")),
    "same_network": Key(BOOL),
    "use_cpu": Key(BOOL),
    "gpu_ids": Key((str, int)),
    "downcast_bf16": Key((bool, str)),
    "enable_cpu_affinity": Key(BOOL),
    "debug": Key(BOOL),
    "gradient_accumulation_steps": Key(INT),
    "max_restarts": Key(INT),
    "monitor_interval": Key(FLOAT),
    "tpu_env": Key((list,)),
    "tpu_use_cluster": Key(BOOL),
    "tpu_use_sudo": Key(BOOL),
    "fsdp_config": Key((dict,), section=FSDP_KEYS),
    "deepspeed_config": Key((dict,), section=DEEPSPEED_KEYS),
    "megatron_lm_config": Key((dict,), section=MEGATRON_KEYS),
    "dynamo_config": Key((dict,), section=DYNAMO_KEYS),
}
DEFAULTS: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "mixed_precision": "no",
                            "num_machines": 1, "num_processes": 1, "machine_rank": 0, "main_process_ip": None,
                            "main_process_port": None, "rdzv_backend": "static", "use_cpu": False}


class ConfigError(ValueError):
    """A launch configuration that cannot be used, with the key, the value and what is allowed."""


def _describe(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def validate(config: dict[str, Any], keys: dict[str, Key] = TOP_KEYS, where: str = "") -> dict[str, Any]:
    """Check every key and value (recursively); return the config unchanged, or raise ConfigError."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where or 'The config'} must be a mapping of keys to values, got {type(config).__name__}.")
    for name, value in config.items():
        path = f"{where}.{name}" if where else name
        if name not in keys:
            close = difflib.get_close_matches(str(name), list(keys), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key {path!r}.{hint} Allowed here: {', '.join(sorted(keys))}.")
        key = keys[name]
        is_bool = isinstance(value, bool)
        fits = isinstance(value, key.types) and not (is_bool and bool not in key.types)
        if not fits:
            raise ConfigError(f"{path}: expected {_describe(key.types)}, got {value!r}.")
        if key.choices is not None and value not in key.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in key.choices], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: {value!r} is not allowed.{hint} Allowed: {', '.join(map(str, key.choices))}.")
        if key.section is not None:
            validate(value, key.section, path)
    for name in ("num_machines", "num_processes"):
        if name in config and config[name] < 1:
            raise ConfigError(f"{name}: must be at least 1, got {config[name]}.")
    return config


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a YAML (or JSON) launch configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No config file at {path}. Write one with `trainer config`, or check the path.")
    with open(path) as file:
        data = json.load(file) if path.suffix == ".json" else yaml.safe_load(file)
    try:
        return validate(data or {})
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG))


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **config}


def save(config: dict[str, Any], path: str | os.PathLike) -> Path:
    validate(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=True))
    return path


def process_environment(config: dict[str, Any]) -> dict[str, str]:
    """The ``TRAINER_*`` variables that carry a configuration to the launched processes."""
    config = with_defaults(config)
    strategy = STRATEGY_OF[config["distributed_type"]]
    env = {
        "TRAINER_MIXED_PRECISION": config["mixed_precision"],
        # NO and MULTI_*: one device for one process, DDP for several; what "auto" picks.
        "TRAINER_STRATEGY": "auto" if strategy in ("single_device", "ddp") else strategy,
    }
    if config["use_cpu"]:  # otherwise an exported TRAINER_USE_CPU stays as it is
        env["TRAINER_USE_CPU"] = "1"
    if "gradient_accumulation_steps" in config:
        env["TRAINER_GRADIENT_ACCUMULATION_STEPS"] = str(config["gradient_accumulation_steps"])
    for section in ("fsdp_config", "deepspeed_config", "megatron_lm_config"):
        if config.get(section):
            env[f"TRAINER_{section.upper()}"] = json.dumps(config[section])
    return env
