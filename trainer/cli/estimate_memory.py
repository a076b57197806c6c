"""``trainer estimate-memory``: how much memory a model needs, before downloading or allocating it.

The model is built inside ``init_empty_weights()``, so its parameters take no memory and a
70B model is estimated in seconds on any machine. It comes from one of:

- a transformers model type (``gpt2``, ``llama``) with its default configuration, changed by
  ``--config key=value``; ``--task`` picks the head (the Auto class);
- a local folder holding a ``config.json``, or the file itself (nothing is downloaded);
- an import path ``package.module:callable`` that returns a ``torch.nn.Module``, called with the
  ``--kwargs key=value`` arguments (the current directory is importable, as with ``python -m``).

For each dtype it prints the largest layer, the weights, inference and training memory; what each
column counts is in ``trainer/inference/estimate.py`` and ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from trainer.cli.errors import CliError
from trainer.inference.estimate import DTYPES, INFERENCE_OVERHEAD, OPTIMIZER_STATES, estimate_memory
from trainer.inference.meta import init_empty_weights
from trainer.parallelism import DIMENSIONS, TRAINED, ParallelismConfig

# --task: the transformers Auto class that builds the model; "auto" follows the config's
# ``architectures`` (a local config.json usually names one) and falls back to the base model.
TASKS = {
    "auto": None,
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}


class EstimateError(CliError):
    """A model that cannot be built from what was given; the message is one sentence for the user."""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("estimate-memory", help="estimate the memory to load, run and train a model",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a transformers model type (gpt2), a local folder or config.json, "
                                      "or package.module:callable returning an nn.Module")
    parser.add_argument("--library", "--library_name", "--library-name", choices=["transformers"], default="transformers",
                        help="the library whose model types MODEL names (import paths are called as they are)")
    parser.add_argument("--task", choices=list(TASKS), default="auto",
                        help="the model's head, for transformers models (default: the config's architecture, else base)")
    parser.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="change the transformers configuration, e.g. n_layer=24 n_embd=1024")
    parser.add_argument("--kwargs", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="keyword arguments for the callable of an import path")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), metavar="DTYPE",
                        help=f"the dtypes to estimate, among {', '.join(DTYPES)} (default: all)")
    parser.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="adam",
                        help="the optimizer whose fp32 states training keeps (default: adam)")
    parser.add_argument("--parallelism", metavar="DIM=SIZE,...",
                        help="a training layout, e.g. dp_shard=8,tp=8 (dp_replicate, dp_shard, tp): adds the training "
                             "memory per device")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    layout = parse_parallelism(args.parallelism) if args.parallelism else None  # before the model is built
    model, description = build_model(args.model, task=args.task, config=args.config, kwargs=args.kwargs)
    rows = estimate_memory(model, args.dtypes, optimizer=args.optimizer)
    if layout is not None:
        for row in rows:
            row.update(per_device(row, layout))
        description += f", laid out as {args.parallelism} ({layout.total_size} devices)"
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, description, args.optimizer))
    return 0


def parse_parallelism(text: str) -> ParallelismConfig:
    """``dp_shard=8,tp=8`` as a ``ParallelismConfig``; a bad part is one error naming it."""
    sizes: dict[str, Any] = {}
    for part in (piece.strip() for piece in text.split(",") if piece.strip()):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in DIMENSIONS:
            close = difflib.get_close_matches(name, TRAINED, n=1)
            raise CliError(f"--parallelism: {name!r} is not a dimension" + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; use {', '.join(TRAINED[:-1])} and {TRAINED[-1]}.")
        if not value.strip().isdigit():
            raise CliError(f"--parallelism: {part!r} needs a whole number, as in {name}=8.")
        sizes[f"{name}_size"] = int(value)
    try:
        return ParallelismConfig(**sizes)
    except ValueError as error:
        raise CliError(f"--parallelism: {error}") from None


def per_device(row: dict[str, Any], layout: ParallelismConfig) -> dict[str, int]:
    """Training memory per device under ``layout``: the sharded state, plus one gathered layer.

    Weights, gradients and optimizer state are split over ``dp_shard x tp x pp`` devices (tensor
    parallelism splits the planned layers; the few it leaves whole are counted as split too;
    pipeline stages hold equal parts). FSDP gathers one layer at a time for its forward and
    backward, itself split over ``tp``.
    """
    shards = layout.dp_shard_size * layout.tp_size * layout.pp_size
    return {"training_per_device_bytes": row["training_bytes"] // shards + row["largest_layer_bytes"] // layout.tp_size}


# --- building the model on the meta device -------------------------------------------------------------


def parse_assignments(items: list[str], flag: str) -> dict[str, Any]:
    """``["n_layer=24", "act=gelu"]`` -> ``{"n_layer": 24, "act": "gelu"}``: JSON or Python literals, else strings."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise EstimateError(f"{flag} takes key=value pairs, and {item!r} has no key=value.")
        try:
            value: Any = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)  # True, None, (1, 2)
            except (ValueError, SyntaxError):
                value = text
        values[key] = value
    return values


def build_model(spec: str, task: str = "auto", config: list[str] | None = None,
                kwargs: list[str] | None = None) -> tuple[nn.Module, str]:
    """The model ``spec`` names, on the meta device, and a one-line description of it."""
    config, kwargs = config or [], kwargs or []
    if ":" in spec and not Path(spec).exists():
        if config or task != "auto":
            raise EstimateError("--config and --task apply to transformers models; "
                                "an import path takes its arguments from --kwargs.")
        model = _from_import_path(spec, parse_assignments(kwargs, "--kwargs"))
    else:
        if kwargs:
            raise EstimateError("--kwargs applies to an import path; a transformers model is changed with --config.")
        model = _from_transformers(spec, task, parse_assignments(config, "--config"))
    parameters = sum(p.numel() for p in model.parameters())
    return model, f"{spec} ({type(model).__name__}, {_count(parameters)} parameters)"


def _from_import_path(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attributes = spec.partition(":")
    if not module_name or not attributes:
        raise EstimateError(f"{spec!r} is not an import path; write it as package.module:callable.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so a project's own modules resolve
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and f"{module_name}.".startswith(f"{error.name}."):  # the path itself, not one of its imports
            raise EstimateError(f"Cannot import {module_name!r}: there is no module named {error.name!r} "
                                "on the Python path.") from None
        raise EstimateError(f"Importing {module_name!r} failed: {_one_line(error)}.") from None
    except Exception as error:  # the module's own code failed: report it, without a traceback
        raise EstimateError(f"Importing {module_name!r} failed: {_one_line(error)}.") from None
    for attribute in attributes.split("."):
        if not hasattr(target, attribute):
            names = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(attribute, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "."
            raise EstimateError(f"{getattr(target, '__name__', module_name)!r} has no attribute {attribute!r}{hint}")
        target = getattr(target, attribute)
    if not callable(target):
        raise EstimateError(f"{spec} is a {type(target).__name__}, not a callable that returns an nn.Module.")
    try:
        with init_empty_weights():
            model = target(**kwargs)
    except Exception as error:
        raise EstimateError(f"Calling {spec}({_call_args(kwargs)}) failed: {_one_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise EstimateError(f"{spec}({_call_args(kwargs)}) returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _from_transformers(spec: str, task: str, overrides: dict[str, Any]) -> nn.Module:
    if "transformers" not in sys.modules:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when transformers is imported: never reach the hub
    try:
        import transformers
    except ImportError:
        raise EstimateError("Model types and configs need transformers: pip install 'trainer-kit[transformers]'.") from None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # building on the meta device warns about things that do not matter here
    try:
        return _build_transformers(transformers, spec, task, overrides)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_transformers(transformers: Any, spec: str, task: str, overrides: dict[str, Any]) -> nn.Module:
    mapping = transformers.CONFIG_MAPPING
    path = Path(spec)
    if path.exists():
        base = _read_config(path)
        model_type = base.get("model_type")
        if not isinstance(model_type, str) or model_type not in mapping:
            raise EstimateError(f"{path} has model_type {model_type!r}, which transformers {transformers.__version__} "
                                "does not know (code shipped with a model is not run).")
    elif spec in mapping:
        model_type, base = spec, {}
    elif spec.endswith(".json") or spec.startswith((".", os.sep, "~")):
        raise EstimateError(f"No file or folder at {spec}; pass an existing model folder or its config.json.")
    else:
        raise EstimateError(_unknown_model_type(spec, list(mapping.keys())))
    config_class = mapping[model_type]
    overrides = _check_config_keys(config_class, base, overrides, model_type)
    try:
        config = config_class.from_dict({**base, **overrides})
    except Exception as error:
        raise EstimateError(f"The {model_type} configuration is invalid: {_one_line(error)}") from None
    model_class = _model_class(transformers, config, task)
    try:
        with init_empty_weights():
            if hasattr(model_class, "from_config"):
                return model_class.from_config(config)
            return model_class(config)
    except Exception as error:
        what = f"{model_type} with --task {task}" if task != "auto" else model_type
        raise EstimateError(f"transformers could not build {what}: {_one_line(error)}") from None


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise EstimateError(f"{path} is a folder without a config.json; pass a model folder or its config.json.")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise EstimateError(f"Cannot read {file} as a JSON configuration: {error}.") from None
    if not isinstance(data, dict):
        raise EstimateError(f"{file} holds a JSON {type(data).__name__}, not a configuration object.")
    return data


def _unknown_model_type(spec: str, model_types: list[str]) -> str:
    close = difflib.get_close_matches(spec.lower(), model_types, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "."
    offline = ("; this command works offline, so pass the local folder or config.json of a hub model"
               if "/" in spec else "")
    return f"Unknown model {spec!r}: not a local folder or config.json, nor one of transformers' model types{offline}{hint}"


def _check_config_keys(config_class: Any, base: dict[str, Any], overrides: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Refuse keys the configuration does not have (it would keep them silently), and map aliases to their names."""
    try:
        default = config_class.from_dict(dict(base))
    except Exception as error:
        raise EstimateError(f"The {model_type} configuration is invalid: {_one_line(error)}") from None
    aliases: dict[str, str] = getattr(config_class, "attribute_map", {}) or {}
    signature = inspect.signature(config_class.__init__).parameters
    valid = set(default.to_dict()) | set(base) | set(aliases) | {
        name for name, p in signature.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    valid = {key for key in valid if not key.startswith("_")}
    checked = {}
    for key, value in overrides.items():
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.6)
            which = f"the closest are {', '.join(close)}" if close else f"valid keys are {', '.join(sorted(valid))}"
            raise EstimateError(f"The {model_type} configuration has no key {key!r}; {which}.")
        checked[aliases.get(key, key)] = value
    return checked


def _model_class(transformers: Any, config: Any, task: str) -> Any:
    if task != "auto":
        return getattr(transformers, str(TASKS[task]))
    for architecture in getattr(config, "architectures", None) or []:
        if hasattr(transformers, architecture):
            return getattr(transformers, architecture)
    return transformers.AutoModel


def _call_args(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())


def _one_line(error: BaseException) -> str:
    """The error's type and message on one line (transformers' validation errors span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


# --- the table -----------------------------------------------------------------------------------------


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_bytes(size: int | None) -> str:
    """Binary units, as ``parse_size`` reads them: ``1.85 GiB``; ``-`` for no figure."""
    if size is None:
        return "-"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def format_table(rows: list[dict[str, Any]], description: str, optimizer: str = "adam") -> str:
    """The rows as an aligned table, under a title and above a legend of what each column counts."""
    header = ["dtype", "largest layer", "total size", "inference", f"training ({optimizer})"]
    cells = [[row["dtype"], f"{format_bytes(row['largest_layer_bytes'])} ({row['largest_layer'] or 'the whole model'})",
              format_bytes(row["total_bytes"]), format_bytes(row["inference_bytes"]), format_bytes(row["training_bytes"])]
             for row in rows]
    laid_out = bool(rows) and "training_per_device_bytes" in rows[0]
    if laid_out:
        header.append("training per device")
        for cell, row in zip(cells, rows):
            cell.append(format_bytes(row["training_per_device_bytes"]))
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = [f"Memory for {description}:", ""]
    for line in [header, ["-" * w for w in widths], *cells]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    states = OPTIMIZER_STATES[optimizer]
    lines += ["",
              "total size: weights and buffers; inference: total size "
              f"+ {INFERENCE_OVERHEAD:.0%} for activations and caches;",
              f"training: weights + gradients + {states} fp32 {optimizer} state(s) per parameter "
              "(+ an fp32 master copy for float16/bfloat16), activations not included."]
    if laid_out:
        lines.append("training per device: training / (dp_shard x tp x pp) + the largest layer / tp (gathered in turn).")
    return "\n".join(lines)
