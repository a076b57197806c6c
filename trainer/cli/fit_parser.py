"""The ``trainer fit`` parser: a jsonargparse parser whose sections come from the classes' signatures.

Sections (each also a ``--section.key value`` flag, the later of a file and a flag winning)::

    trainer_class   module:Class of the Trainer subclass (or path/to/file.py:Class)
    model           class_path + init_args of an nn.Module, or of a function returning one
    data            train_data, eval_data: class_path + init_args of a Dataset, or of a function returning one
    trainer         the Trainer subclass's own constructor arguments (max_epochs, batch_size, precision...)
    optimizer       optional: class_path + init_args of a torch optimizer (without params)
    lr_scheduler    optional: class_path + init_args of a scheduler (without optimizer)
    resume          optional: "latest" or a checkpoint folder, as ``Trainer.fit(resume=...)``

The Trainer class must be known before the parser is built (its signature gives the ``trainer``
section), so ``choose_trainer_class`` reads it from the command line first.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace
from torch import nn
from torch.utils.data import Dataset

from trainer.cli.errors import CliError, one_line
from trainer.cli.fit_errors import explain
from trainer.cli.fit_imports import DEFAULT_TRAINER

PROG = "trainer fit"
# What the command passes to the Trainer itself; the other constructor arguments form the trainer section.
BUILT_HERE = frozenset({"model", "optimizer", "scheduler", "train_data", "eval_data"})
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DESCRIPTION = """\
Build a Trainer subclass from a YAML config and --section.key overrides, then train it (fit).

  trainer fit fit.yaml --trainer.max_epochs 2          # the config names trainer_class: module:Class
  trainer fit my_project.train:MyTrainer --config fit.yaml
  trainer fit fit.yaml --print_config                   # the merged config, as YAML
  trainer fit path/to/train.py:MyTrainer --help         # that Trainer's arguments

The seed (trainer.seed) is set before the model is built; the model is built first, then the data,
then the Trainer. Every checkpoint holds the resolved config as fit_config.json, which
--config accepts as it is.
"""


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (each argument's type and default), with the description's lines kept as written."""


def choose_trainer_class(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The Trainer class to build, and the arguments for the parser.

    The words before the first flag are config files (``.yaml``, ``.yml``, ``.json``: as ``--config``,
    first) and the Trainer class (then given to the parser last, so that it wins). Without a class
    there, the last ``--trainer_class`` of the config files and flags, in their order; else the
    plain ``trainer:Trainer``. Every config file is read here: a missing one or a YAML mistake is a
    ``CliError`` naming the file (and the line).
    """
    args = list(argv)
    if args[:1] == ["--"]:  # trainer launch ... -m trainer.cli.fit -- ...: the separator is not a word
        args = args[1:]
    words: list[str] = []
    while args and not args[0].startswith("-"):
        words.append(args.pop(0))
    files = [word for word in words if word.lower().endswith(CONFIG_SUFFIXES)]
    classes = [word for word in words if word not in files]
    if len(classes) > 1:
        raise CliError(f"{len(classes)} Trainer classes given ({', '.join(classes)}): give one, module:Class or "
                       f"path/to/file.py:Class (a config file ends in {', '.join(CONFIG_SUFFIXES)}).")
    args = [*(f"--config={path}" for path in files), *args]
    chosen = DEFAULT_TRAINER
    for index, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if not equals:
            value = args[index + 1] if index + 1 < len(args) else ""
        if flag == "--trainer_class" and value:
            chosen = value
        elif flag == "--config" and value:  # every file is read (and checked) here, before anything is imported
            chosen = _trainer_class_in_file(value) or chosen
    if classes:
        return classes[0], [*args, f"--trainer_class={classes[0]}"]
    return chosen, args


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise CliError(f"line {line}: {key_node.value} is set twice (first at line {seen[key_node.value]}) "
                                   "and YAML would keep the last value silently; keep one.")
                seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def read_config_file(value: str) -> dict[str, Any] | None:
    """A ``--config`` file's sections, read before the parser: a missing file or bad YAML is one ``CliError``.

    The error names the file, and the line and column of the YAML mistake. None for a config given
    inline as text (``--config '{trainer: {max_epochs: 2}}'``), which the parser reads itself.
    """
    path = Path(value)
    if not path.is_file():
        if "\n" in value or value.lstrip().startswith("{"):
            return None
        relative = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        problem = "is a folder, not a file" if path.is_dir() else f"does not exist{relative}"
        raise CliError(f"config file {value} {problem}; check the path.")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except CliError as error:
        raise CliError(f"config file {value}, {error}") from None
    except UnicodeDecodeError:
        raise CliError(f"config file {value} is not UTF-8 text; save it as UTF-8.") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise CliError(f"config file {value}{where}: {error.problem or error.context}; fix the YAML there.") from None
    except yaml.YAMLError as error:
        raise CliError(f"config file {value} is not valid YAML: {one_line(error)}.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise CliError(f"config file {value} holds a {type(loaded).__name__}, not sections (trainer_class:, model:, "
                       "data:, trainer: ...).")
    return loaded


def _trainer_class_in_file(value: str) -> str | None:
    found = (read_config_file(value) or {}).get("trainer_class")
    return found if isinstance(found, str) else None


def build_parser(trainer_class: type[Any], trainer_spec: str) -> ArgumentParser:
    """The parser for ``trainer_class``: the sections above, typed and documented from the signatures."""
    parser = ArgumentParser(prog=PROG, description=DESCRIPTION, exit_on_error=False, allow_abbrev=False,
                            formatter_class=_HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML (or JSON) file of the sections; may be given several times, later ones win")
    parser.add_argument("--trainer_class", type=str, default=trainer_spec,
                        help="the Trainer subclass, module:Class or path/to/file.py:Class (or the first argument)")
    parser.add_argument("--model", type=nn.Module, required=True,
                        help="the model: class_path (and init_args) of an nn.Module, or of a function returning one")
    data = parser.add_argument_group("data", "the datasets: class_path + init_args of a torch or Hugging Face "
                                             "Dataset, or of a function annotated to return one")
    import datasets  # a dependency of trainer-kit; its Dataset is one of the kinds the Trainer takes

    kinds = Dataset | datasets.Dataset | None
    data.add_argument("--data.train_data", type=kinds, default=None, help="the data to train on")
    data.add_argument("--data.eval_data", type=kinds, default=None, help="the data to validate on")
    parser.add_class_arguments(trainer_class, "trainer", instantiate=False, skip=set(BUILT_HERE), fail_untyped=False)
    parser.add_argument("--optimizer", type=Callable[[Iterable], torch.optim.Optimizer] | None, default=None,
                        help="the optimizer, e.g. AdamW --optimizer.lr 0.001 (default: the Trainer's "
                             "configure_optimizers)")
    parser.add_argument("--lr_scheduler", type=Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
                        | None, default=None, help="a learning-rate scheduler for the optimizer section, stepped once "
                                                   "per optimizer step")
    parser.add_argument("--resume", type=str | None, default=None,
                        help='"latest" (the newest checkpoint in trainer.output_dir, if any) or a checkpoint folder')
    return parser


_TORCH_HOMES = {"--optimizer": torch.optim, "--lr_scheduler": torch.optim.lr_scheduler}


def _torch_names(argv: list[str]) -> list[str]:
    """``--optimizer SGD`` as ``torch.optim.SGD`` (and schedulers alike): a bare name means torch's class, even
    when another loaded package (bitsandbytes) has a class of the same name."""
    names = list(argv)
    for index, word in enumerate(names[:-1]):
        home = _TORCH_HOMES.get(word)
        value = names[index + 1]
        if home is not None and "." not in value and isinstance(getattr(home, value, None), type):
            names[index + 1] = f"{home.__name__}.{value}"
    return names


def parse(parser: ArgumentParser, argv: Sequence[str]) -> Namespace | None:
    """The merged, checked config; None when ``--help`` or ``--print_config`` printed and the command is done.

    A mistake is one ``CliError`` (the key, what is wrong, the closest key that exists).
    """
    try:
        return parser.parse_args(_torch_names(list(argv)))
    except SystemExit as done:  # --help and --print_config print, then exit
        if done.code not in (0, None):
            raise CliError(f"could not parse the arguments (exit status {done.code}).") from None
        return None
    except argparse.ArgumentError as error:
        raise CliError(explain(parser, error)) from None


def dump_json(parser: ArgumentParser, config: Namespace) -> str:
    """The resolved config as JSON text (what checkpoints store; ``--config`` reads it back)."""
    return parser.dump(config, format="json_indented")
