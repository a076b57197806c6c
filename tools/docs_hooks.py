"""MkDocs hooks (``hooks:`` in mkdocs.yml): pages generated from the code at build time.

* ``configuration.md``: the ``<!-- generated: config-keys -->`` marker is replaced by a table of
  every key of the launch configuration, read from the schema in ``trainer/config.py``
  (``TOP_KEYS`` and its sections, ``DEFAULTS``). Change a key, its allowed values or a default
  there and the page changes with it.
* ``troubleshooting.md``: the ``<!-- generated: error-index -->`` marker is replaced by every
  ``raise`` of ``ValueError``/``TypeError``/``ImportError``/``ConfigError`` (and their
  subclasses defined in the project) in ``trainer/``, ``callbacks/`` and ``strategies/``,
  with the message as written in the source, read with ``ast``.

Both generators are plain functions (``config_table``, ``error_index``) so tests can call them.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG_MARKER = "<!-- generated: config-keys -->"
ERRORS_MARKER = "<!-- generated: error-index -->"
PACKAGES = ("trainer", "callbacks", "strategies")

# What each key means. The schema (types, allowed values, defaults) comes from trainer.config;
# only the prose is kept here. A key missing from this table is still listed, with its type.
COMPAT = "Accepted so that files written by Accelerate load; not used by `trainer launch`."
MEANING: dict[str, str] = {
    "compute_environment": "Where the job runs. `AMAZON_SAGEMAKER` is accepted in files written for Accelerate.",
    "distributed_type": "How the processes share the work; picks the strategy (see the table below).",
    "mixed_precision": "The precision policy, handed to the processes as `TRAINER_MIXED_PRECISION`.",
    "num_machines": "Number of machines (nodes). At least 1.",
    "num_processes": "Total number of processes over all machines. At least 1.",
    "machine_rank": "The rank of this machine, `0` to `num_machines - 1`.",
    "main_process_ip": "Address of the rank-0 machine (multi-machine runs).",
    "main_process_port": ("Port of machine 0. On one machine, `null` uses torchrun's standalone rendezvous on a free port; "
                          "on several, `null` means 29500."),
    "main_training_function": "Name of the training function; written by `trainer config`. " + COMPAT,
    "rdzv_backend": "torchrun's rendezvous backend.",
    "same_network": "Whether all machines are on the same network. " + COMPAT,
    "use_cpu": "Run on the CPU even where an accelerator is present (`TRAINER_USE_CPU=1`).",
    "gpu_ids": "Which GPUs to use (`all` or a list). " + COMPAT,
    "downcast_bf16": "Accelerate's XLA bf16 downcast flag. " + COMPAT,
    "enable_cpu_affinity": "CPU affinity of the processes. " + COMPAT,
    "debug": "Accelerate's debug mode. " + COMPAT,
    "gradient_accumulation_steps": "Micro-batches per optimizer step (`TRAINER_GRADIENT_ACCUMULATION_STEPS`).",
    "max_restarts": "How many times a failed run is restarted (default 0).",
    "monitor_interval": "Seconds between torchrun's checks of its workers (default 0.1).",
    "tpu_env": "TPU pod environment. " + COMPAT,
    "tpu_use_cluster": "TPU pod launch. " + COMPAT,
    "tpu_use_sudo": "TPU pod launch with sudo. " + COMPAT,
    "fsdp_config": "FSDP settings, when `distributed_type: FSDP` (handed over as `TRAINER_FSDP_CONFIG`).",
    "deepspeed_config": "DeepSpeed settings, when `distributed_type: DEEPSPEED` (`TRAINER_DEEPSPEED_CONFIG`).",
    "megatron_lm_config": "Megatron-LM settings, when `distributed_type: MEGATRON_LM` (`TRAINER_MEGATRON_LM_CONFIG`).",
    "dynamo_config": "torch.compile settings. " + COMPAT,
    "fsdp_version": "FSDP 1 (`FullyShardedDataParallel`) or FSDP 2 (`fully_shard`).",
    "fsdp_auto_wrap_policy": "How modules are wrapped into FSDP units.",
    "fsdp_backward_prefetch": "When the next parameters are gathered during backward.",
    "fsdp_backward_prefetch_policy": "Older spelling of `fsdp_backward_prefetch`.",
    "fsdp_cpu_ram_efficient_loading": "Load the weights on rank 0 only and broadcast them.",
    "fsdp_forward_prefetch": "Gather the next parameters during forward.",
    "fsdp_offload_params": "Keep parameters (and gradients) on the CPU.",
    "fsdp_sharding_strategy": "What is sharded: parameters, gradients, optimizer state (name or Accelerate's number 1-5).",
    "fsdp_reshard_after_forward": "Free the gathered parameters after forward (FSDP 2).",
    "fsdp_state_dict_type": "Whether checkpoints hold full or sharded state.",
    "fsdp_sync_module_states": "Broadcast rank 0's weights at wrap time.",
    "fsdp_use_orig_params": "Keep the original parameters visible to the optimizer (FSDP 1).",
    "fsdp_transformer_layer_cls_to_wrap": "Class name(s) of the layers wrapped by `TRANSFORMER_BASED_WRAP`.",
    "fsdp_min_num_params": "Parameter threshold of `SIZE_BASED_WRAP`.",
    "fsdp_activation_checkpointing": "Recompute activations of the wrapped layers during backward.",
    "zero_stage": "ZeRO stage: 0 none, 1 optimizer state, 2 + gradients, 3 + parameters.",
    "offload_optimizer_device": "Where the optimizer state is offloaded.",
    "offload_param_device": "Where parameters are offloaded (ZeRO-3).",
    "offload_optimizer_nvme_path": "Directory for NVMe optimizer offload.",
    "offload_param_nvme_path": "Directory for NVMe parameter offload.",
    "zero3_init_flag": "Build the model already partitioned (ZeRO-3).",
    "zero3_save_16bit_model": "Gather a 16-bit copy of the weights when saving under ZeRO-3.",
    "deepspeed_config_file": "A DeepSpeed JSON config used instead of these keys.",
    "deepspeed_hostfile": "DeepSpeed's hostfile for multi-machine launches.",
    "deepspeed_multinode_launcher": "The launcher DeepSpeed uses across machines.",
    "deepspeed_inclusion_filter": "DeepSpeed's `--include` filter of hosts/devices.",
    "deepspeed_exclusion_filter": "DeepSpeed's `--exclude` filter of hosts/devices.",
    "gradient_clipping": "Maximum gradient norm.",
    "megatron_lm_tp_degree": "Tensor-parallel degree.",
    "megatron_lm_pp_degree": "Pipeline-parallel degree.",
    "megatron_lm_num_micro_batches": "Micro-batches per pipeline step.",
    "megatron_lm_sequence_parallelism": "Shard activations along the sequence dimension.",
    "megatron_lm_recompute_activations": "Recompute activations during backward.",
    "megatron_lm_use_distributed_optimizer": "Shard the optimizer state over data-parallel ranks.",
    "megatron_lm_gradient_clipping": "Maximum gradient norm.",
    "dynamo_backend": "torch.compile backend (`inductor`, ...; `no` for none).",
    "dynamo_mode": "torch.compile mode.",
    "dynamo_use_fullgraph": "`fullgraph=True`: fail on graph breaks.",
    "dynamo_use_dynamic": "`dynamic=True`: compile for dynamic shapes.",
}

_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping", type(None): "null"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _yaml(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def _rows(keys: dict[str, Any], defaults: dict[str, Any], prefix: str) -> list[str]:
    rows = []
    for name, key in keys.items():
        path = f"{prefix}{name}"
        kind = " or ".join(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in key.types))
        if key.choices is not None:
            kind += ": " + ", ".join(_yaml(choice) for choice in key.choices)
        default = _yaml(defaults[name]) if name in defaults else "—"
        anchor = path.replace(".", "-").replace("_", "-")
        rows.append(f'| <a id="{anchor}"></a>`{path}` | {_cell(kind)} | {default} | {_cell(MEANING.get(name, ""))} |')
        if key.section is not None:
            rows.extend(_rows(key.section, {}, f"{path}."))
    return rows


def config_table(config_module: Any = None) -> str:
    """Markdown for every key of the launch configuration, from ``trainer.config``'s schema."""
    if config_module is None:
        config_module = _import("trainer.config")
    lines = ["| key | type / allowed values | default | meaning |", "|---|---|---|---|"]
    lines += _rows(config_module.TOP_KEYS, config_module.DEFAULTS, "")
    lines += ["", "`distributed_type` selects the strategy the launched processes run:", "",
              "| `distributed_type` | strategy |", "|---|---|"]
    lines += [f"| `{kind}` | `{strategy}` |" for kind, strategy in config_module.STRATEGY_OF.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The error index

ERROR_TYPES = {"ValueError", "TypeError", "ImportError", "ModuleNotFoundError",  # and the ValueError subclasses:
               "ConfigError", "DeviceMapError", "CheckpointError", "Fp8UnavailableError", "ShardedCheckpointError",
               "TrackerPackageMissing"}  # an ImportError


def _message(node: ast.AST | None) -> str:
    """The message as written: string parts verbatim, ``{expression}`` for f-string fields."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:
                conversion = "!" + chr(value.conversion) if value.conversion > 0 else ""
                spec = ":" + _message(value.format_spec) if value.format_spec is not None else ""
                parts.append("{" + ast.unparse(value.value) + conversion + spec + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _message(node.left) + _message(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _message(node.func.value)
    return "{" + ast.unparse(node) + "}"


def _errors_in(path: Path) -> list[tuple[str, str, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{where}.{child.name}" if where else child.name)
                continue
            if isinstance(child, ast.Raise) and isinstance(child.exc, ast.Call):
                func = child.exc.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in ERROR_TYPES:
                    message = _message(child.exc.args[0] if child.exc.args else None)
                    found.append((name, where or "(module)", message))
            visit(child, where)

    visit(tree, "")
    return found


def error_index(root: Path = ROOT) -> str:
    """Markdown: one section per module, one row per ``raise`` of a user-facing error."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            errors = [error for error in _errors_in(path) if error[2]]
            if not errors:
                continue
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            out += [f"### `{module}`", "", "| error | raised in | message |", "|---|---|---|"]
            for name, where, message in errors:
                out.append(f"| `{name}` | `{where}` | {_cell(_code_safe(message))} |")
            out.append("")
    return "\n".join(out)


def _code_safe(message: str) -> str:
    """The message in an inline code span (backticks inside become quotes)."""
    return "<code>" + message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "'") + "</code>"


def _import(name: str) -> Any:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_table())
    if ERRORS_MARKER in markdown:
        markdown = markdown.replace(ERRORS_MARKER, error_index())
    return markdown
