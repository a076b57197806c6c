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

from trainer import launch_environment as variables
from trainer.precision.names import precision_names
from trainer.strategies import registry
from trainer.strategies.base import Strategy
from trainer.strategies.spec import StrategySpec, check_value
from trainer.utils.enums import DynamoBackend

CONFIG_ENV = "TRAINER_CONFIG_FILE"
DEFAULT_CONFIG = Path(os.environ.get("TRAINER_HOME", Path.home() / ".cache" / "trainer")) / "default_config.yaml"

@dataclass(frozen=True)
class Key:
    """One allowed top-level key: its Python types, the allowed values where they are a fixed set, one line of help."""

    types: tuple[type, ...]
    help: str = ""
    choices: tuple[Any, ...] | None = None
    minimum: int | float | None = None
    section: dict[str, Key] | None = None  # a nested mapping with keys of its own
    default: Any = None  # what an absent key means (shown in the docs), where known


BOOL, INT, STR, FLOAT = (bool,), (int,), (str,), (int, float)
OPT_STR, OPT_INT = (str, type(None)), (int, type(None))
COMPAT = "Accepted so that files written by Accelerate load; not used by `trainer launch`."

# The keys that belong to the launch itself. distributed_type, mixed_precision and the strategies'
# sections are added by top_keys(), from the strategies' specs and the precision table.
LAUNCH_KEYS: dict[str, Key] = {
    "compute_environment": Key(STR, "Where the job runs. `AMAZON_SAGEMAKER` is accepted in files written for Accelerate.",
                               ("LOCAL_MACHINE", "AMAZON_SAGEMAKER")),
    "num_machines": Key(INT, "Number of machines (nodes). At least 1.", minimum=1),
    "num_processes": Key(INT, "Total number of processes over all machines. At least 1.", minimum=1),
    "machine_rank": Key(INT, "The rank of this machine, `0` to `num_machines - 1`."),
    "main_process_ip": Key(OPT_STR, "Address of the rank-0 machine (multi-machine runs)."),
    "main_process_port": Key(OPT_INT, "Port of machine 0. On one machine, `null` uses torchrun's standalone rendezvous on a "
                                      "free port; on several, `null` means 29500."),
    "main_training_function": Key(STR, "Name of the training function; written by `trainer config`. " + COMPAT),
    "rdzv_backend": Key(STR, "torchrun's rendezvous backend.", ("static", "c10d", "etcd", "etcd-v2")),
    "same_network": Key(BOOL, "Whether all machines are on the same network. " + COMPAT),
    "use_cpu": Key(BOOL, "Run on the CPU even where an accelerator is present (`TRAINER_USE_CPU=1`)."),
    "gpu_ids": Key((str, int), "Which GPUs to use (`all` or a list such as `0,1`): `CUDA_VISIBLE_DEVICES`."),
    "downcast_bf16": Key((bool, str), "Accelerate's XLA bf16 downcast flag. " + COMPAT),
    "enable_cpu_affinity": Key(BOOL, "CPU affinity of the processes. " + COMPAT),
    "debug": Key(BOOL, "Check collectives' arguments across processes (`TORCH_DISTRIBUTED_DEBUG=DETAIL`)."),
    "gradient_accumulation_steps": Key(INT, "Micro-batches per optimizer step (`TRAINER_GRADIENT_ACCUMULATION_STEPS`)."),
    "max_restarts": Key(INT, "How many times a failed run is restarted (default 0)."),
    "monitor_interval": Key(FLOAT, "Seconds between torchrun's checks of its workers (default 0.1)."),
    "process_group_timeout": Key(FLOAT, "Seconds a collective waits for the other processes before the job fails "
                                        "(`TRAINER_PROCESS_GROUP_TIMEOUT`; default: torch's, 30 minutes on gloo, 10 on "
                                        "NCCL). `InitProcessGroupKwargs(timeout=...)` in the script wins.", minimum=1),
    "tpu_env": Key((list,), "TPU pod environment. " + COMPAT),
    "tpu_use_cluster": Key(BOOL, "TPU pod launch. " + COMPAT),
    "tpu_use_sudo": Key(BOOL, "TPU pod launch with sudo. " + COMPAT),
    "dynamo_config": Key((dict,), "torch.compile for the prepared models (`TRAINER_DYNAMO_CONFIG`; "
                                  "`Accelerator(dynamo_backend=...)` in the script wins).", section={
        "dynamo_backend": Key(STR, "torch.compile backend (`inductor`, `aot_eager`, `eager`...; `no` for none).",
                              choices=tuple(backend.value for backend in DynamoBackend)
                              + tuple(backend.value.lower() for backend in DynamoBackend)),
        "dynamo_mode": Key(STR, "torch.compile mode (`default`, `reduce-overhead`, `max-autotune`...)."),
        "dynamo_use_fullgraph": Key(BOOL, "`fullgraph=True`: fail on graph breaks."),
        "dynamo_use_dynamic": Key(BOOL, "`dynamic=True`: compile for dynamic shapes."),
        "dynamo_use_regional_compilation": Key(BOOL, "Compile each block of the model's `nn.ModuleList`s."),
    }),
    "fp8_config": Key((dict,), "Accelerate's fp8 recipe section. fp8 runs through torchao here "
                               "(`mixed_precision: fp8`): `backend: AO` is used, `TE` and `MS-AMP` stop the launch.",
                      section={"backend": Key(STR, "`AO` (torchao); `TE`, `MS-AMP` are not available.",
                                              ("AO", "TE", "MS-AMP", "MSAMP", "ao", "te", "msamp")),
                               **{name: Key((bool, int, float, str, list), "A TransformersEngine/MS-AMP setting. " + COMPAT)
                                  for name in ("amax_history_len", "amax_compute_algo", "fp8_format", "interval",
                                               "margin", "override_linear_precision", "use_autocast_during_eval",
                                               "opt_level", "enable_fsdp_float8_all_gather", "pad_inner_dim")}}),
    "parallelism_config": Key((dict,), "Accelerate's N-D parallelism sizes. Sizes above 1 stop the launch: N-D "
                                       "parallelism is not available in `trainer launch` yet.",
                              section={f"parallelism_config_{name}": Key((int, str, bool), "")
                                       for name in ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size",
                                                    "cp_backend", "cp_comm_strategy", "sp_size", "sp_backend",
                                                    "sp_seq_length", "sp_seq_length_is_variable",
                                                    "sp_attn_implementation")}),
}
DEFAULTS: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "mixed_precision": "no",
                            "num_machines": 1, "num_processes": 1, "machine_rank": 0, "main_process_ip": None,
                            "main_process_port": None, "rdzv_backend": "static", "use_cpu": False}


def strategy_section(strategy: type[Strategy]) -> Key:
    """A strategy's section of the launch configuration, as its spec declares it (defaults: its constructor's)."""
    spec, defaults = strategy.spec, strategy.option_defaults()
    keys = {option.key: Key(option.types, option.help + (f" {option.unused}" if option.unused else ""), option.choices,
                            option.minimum, default=defaults.get(option.key))
            for option in spec.options}
    kinds = " or ".join(f"`{kind}`" for kind in spec.distributed_types)
    return Key((dict,), f"{spec.name} settings, when `distributed_type` is {kinds} (handed over as "
                        f"`{spec.environment_variable}`).", section=keys)


def top_keys() -> dict[str, Key]:
    """Every allowed top-level key: the launch's own, ``distributed_type``, ``mixed_precision`` and each strategy's section."""
    keys = {"distributed_type": Key(STR, "How the processes share the work; picks the strategy (see the table below).",
                                    registry.distributed_types()),
            "mixed_precision": Key(STR, "The precision policy, handed to the processes as `TRAINER_MIXED_PRECISION`.",
                                   precision_names()),
            **LAUNCH_KEYS}
    for strategy in registry.strategy_classes():
        if strategy.spec.section is not None:
            keys[strategy.spec.section] = strategy_section(strategy)
    return keys


class ConfigError(ValueError):
    """A launch configuration that cannot be used, with the key, the value and what is allowed."""


def validate(config: dict[str, Any], keys: dict[str, Key] | None = None, where: str = "") -> dict[str, Any]:
    """Check every key and value (recursively); return the config unchanged, or raise ConfigError."""
    keys = top_keys() if keys is None else keys
    if not isinstance(config, dict):
        raise ConfigError(f"{where or 'The config'} must be a mapping of keys to values, got {type(config).__name__}.")
    for name, value in config.items():
        path = f"{where}.{name}" if where else name
        if name not in keys:
            close = difflib.get_close_matches(str(name), list(keys), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key {path!r}.{hint} Allowed here: {', '.join(sorted(keys))}.")
        key = keys[name]
        try:
            check_value(value, key.types, path, key.choices, key.minimum)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if key.section is not None:
            validate(value, key.section, path)
    return config


def check_launchable(config: dict[str, Any]) -> None:
    """Refuse, with the reason, settings of a valid file that cannot run here (raise ConfigError)."""
    backend = str(config.get("fp8_config", {}).get("backend", "AO")).upper().replace("-", "")
    if backend != "AO":
        raise ConfigError(f"fp8_config.backend: {config['fp8_config']['backend']!r} is not available: fp8 runs through "
                          "torchao here; set backend: AO (or remove fp8_config) and keep mixed_precision: fp8.")
    sizes = {key: value for key, value in config.get("parallelism_config", {}).items()
             if key.endswith("_size") and isinstance(value, int) and value > 1}
    if sizes:
        raise ConfigError(f"parallelism_config: {', '.join(f'{k}={v}' for k, v in sizes.items())} is not available: "
                          "N-D parallelism is not available in trainer launch; use the fsdp or megatron strategy.")


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


def strategy_spec(config: dict[str, Any]) -> StrategySpec:
    """The spec of the strategy a (validated) configuration's ``distributed_type`` selects."""
    return registry.strategy_for_distributed_type(with_defaults(config)["distributed_type"]).spec


def process_environment(config: dict[str, Any]) -> dict[str, str]:
    """The ``TRAINER_*`` variables that carry a configuration to the launched processes."""
    config = with_defaults(config)
    spec = strategy_spec(config)
    env = {
        variables.PRECISION: config["mixed_precision"],
        # NO and MULTI_*: one device for one process, DDP for several; what "auto" picks.
        variables.STRATEGY: "auto" if spec.picked_by_auto else spec.name,
    }
    if config["use_cpu"]:  # otherwise an exported TRAINER_USE_CPU stays as it is
        env[variables.USE_CPU] = "1"
    if "gradient_accumulation_steps" in config:
        env[variables.ACCUMULATION] = str(config["gradient_accumulation_steps"])
    if "process_group_timeout" in config:
        env[variables.PROCESS_GROUP_TIMEOUT] = str(config["process_group_timeout"])
    if str(config.get("dynamo_config", {}).get("dynamo_backend", "no")).lower() != "no":
        env[variables.DYNAMO] = json.dumps(config["dynamo_config"])
    for other in registry.strategy_specs():
        if other.section is not None and other.environment_variable is not None and config.get(other.section):
            env[other.environment_variable] = json.dumps(config[other.section])
    return env
