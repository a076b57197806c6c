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
from trainer.parallelism import TRAINED, ParallelismConfig
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
# What a launch hands its processes as the process-group timeout when neither the configuration nor the
# environment names one: NCCL's own default, and a third of gloo's (30 minutes), so a lost process ends a job
# within 10 minutes on every backend.
DEFAULT_PROCESS_GROUP_TIMEOUT = 600

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
                                        "(`TRAINER_PROCESS_GROUP_TIMEOUT`, unless that is already exported), so a lost "
                                        "process ends the job instead of hanging it. `InitProcessGroupKwargs(timeout=...)` "
                                        "or `PartialState(timeout=...)` in the script wins.", minimum=1,
                                 default=DEFAULT_PROCESS_GROUP_TIMEOUT),
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
    "parallelism_config": Key((dict,), "N-D parallelism sizes (`ParallelismConfig`): `parallelism_config_dp_replicate_size`, "
                                       "`_dp_shard_size`, `_tp_size` and `_pp_size`, whose product is the process count; context "
                                       "and sequence parallel sizes above 1 stop the launch.",
                              section={f"parallelism_config_{name}": Key((int, str, bool), "")
                                       for name in (*(f"{dimension}_size" for dimension in TRAINED), "cp_size",
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
    section = config.get("parallelism_config", {})
    refused = {key: value for key, value in section.items() if key.removeprefix("parallelism_config_") in
               ("cp_size", "sp_size") and isinstance(value, int) and value > 1}
    if refused:
        raise ConfigError(f"parallelism_config: {', '.join(f'{k}={v}' for k, v in refused.items())} is not available: "
                          "context and sequence parallelism are not available here; keep them at 1.")
    sizes = parallelism_sizes(config)
    if sizes:
        try:
            layout = ParallelismConfig(**sizes)
        except ValueError as error:
            raise ConfigError(f"parallelism_config: {error}") from None
        processes = config.get("num_processes")
        if isinstance(processes, int) and processes != layout.total_size:
            raise ConfigError(f"parallelism_config: the sizes span {layout.total_size} processes but num_processes is "
                              f"{processes}: make their product equal num_processes.")


def parallelism_sizes(config: dict[str, Any]) -> dict[str, Any]:
    """``ParallelismConfig``'s arguments from the ``parallelism_config`` section, when a size above 1 is set."""
    section = config.get("parallelism_config", {})
    sizes = {name: section.get(f"parallelism_config_{name}", section.get(name, 1))
             for name in (f"{dimension}_size" for dimension in TRAINED)}
    return sizes if any(isinstance(v, int) and not isinstance(v, bool) and v > 1 for v in sizes.values()) else {}


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a YAML (or JSON) launch configuration; every problem is one ConfigError naming the file."""
    path = Path(path)
    data = _read(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        kinds: dict[type, str] = {list: "a list", str: "a single string"}
        kind = kinds.get(type(data), f"a single {type(data).__name__}")
        raise ConfigError(f"{path} holds {kind}, not a mapping of keys to values: write one `key: value` per line, "
                          "e.g. `distributed_type: MULTI_GPU` (`trainer config` writes such a file).")
    try:
        return validate(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _read(path: Path) -> Any:
    """The file's data: YAML (JSON for ``.json``), decoded as UTF-8, with its mistakes named by line and column."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file; pass the YAML file itself "
                          "(`trainer config` writes one, by default default_config.yaml).")
    if not path.is_file():
        raise ConfigError(f"No config file at {path}. Write one with `trainer config`, or check the path.")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"Cannot read the config file {path}: {error.strerror}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line, column = _position(raw, error.start)
        raise ConfigError(f"{path} is not UTF-8 text: byte 0x{raw[error.start]:02x} at line {line}, column {column} "
                          "cannot be read; save the file as UTF-8.") from None
    if path.suffix == ".json":
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}, line {error.lineno}, column {error.colno}: {error.msg}; fix the JSON there.") from None
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        raise ConfigError(f"{path}, {_yaml_problem(error)}; fix the YAML there.") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}.") from None
    if isinstance(document, yaml.MappingNode):
        _check_nodes(path, document, top_keys(), "")
    return data


def _position(raw: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of a byte offset."""
    return raw.count(b"\n", 0, offset) + 1, offset - (raw.rfind(b"\n", 0, offset) + 1) + 1


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """``line 3, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence ... line 1)``."""
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
    problem = error.problem or "the YAML cannot be read"
    if error.context and error.context_mark is not None and error.context_mark is not mark:
        context = f" ({error.context} that starts at line {error.context_mark.line + 1}, column {error.context_mark.column + 1})"
    else:
        context = f" ({error.context})" if error.context else ""
    return f"{where}: {problem}{context}"


def _check_nodes(path: Path, node: yaml.MappingNode, keys: dict[str, Key], where: str) -> None:
    """Refuse a key written twice (YAML keeps the last silently) and a YAML 1.1 boolean where text is expected."""
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        name, line = str(key_node.value), key_node.start_mark.line + 1
        dotted = f"{where}.{name}" if where else name
        if name in seen:
            raise ConfigError(f"{path}, line {line}: {dotted} is set twice (first at line {seen[name]}) and YAML would "
                              "silently keep the last value; keep one.")
        seen[name] = line
        key = keys.get(name)
        if key is None:
            continue
        if (isinstance(value_node, yaml.ScalarNode) and value_node.tag == "tag:yaml.org,2002:bool"
                and bool not in key.types and str in key.types):
            value = value_node.value
            raise ConfigError(f"{path}, line {value_node.start_mark.line + 1}: {dotted}: {value} is read as the boolean "
                              f"{str(value.lower() in ('yes', 'y', 'on', 'true')).lower()}, not as text (YAML reads "
                              f"unquoted yes/no/on/off/true/false as booleans); quote it: {name}: \"{value}\".")
        if key.section is not None and isinstance(value_node, yaml.MappingNode):
            _check_nodes(path, value_node, key.section, dotted)


def _write(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; pass a file path for the configuration, e.g. {path / 'default_config.yaml'}.")
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError as error:
        if partial.parent.is_dir():
            partial.unlink(missing_ok=True)
        raise ConfigError(f"Cannot write the configuration to {path}: {error.strerror}; pass another --config_file.") from None
    return path


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG))


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **config}


def save(config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a checked configuration as YAML; an existing file is replaced only once the new one is complete."""
    validate(config)
    return _write(Path(path), yaml.safe_dump(config, sort_keys=True))


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
    elif variables.PROCESS_GROUP_TIMEOUT not in os.environ:
        env[variables.PROCESS_GROUP_TIMEOUT] = str(DEFAULT_PROCESS_GROUP_TIMEOUT)
    if str(config.get("dynamo_config", {}).get("dynamo_backend", "no")).lower() != "no":
        env[variables.DYNAMO] = json.dumps(config["dynamo_config"])
    for other in registry.strategy_specs():
        if other.section is not None and other.environment_variable is not None and config.get(other.section):
            env[other.environment_variable] = json.dumps(config[other.section])
    sizes = parallelism_sizes(config)
    if sizes:
        env[variables.PARALLELISM] = json.dumps(sizes)
    return env
