"""``trainer config``: write the launch configuration (interactive, or detected), or check one.

    trainer config                      # questions on the terminal (or answers piped to stdin)
    trainer config default [--cpu]      # no questions: one machine, every accelerator found
    trainer config validate FILE        # check a YAML file, key by key
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from trainer import config as launch_config
from trainer.cli.errors import CliError
from trainer.devices import accelerator_type
from trainer.precision.names import precision_names
from trainer.strategies import registry
from trainer.strategies.base import Strategy


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("config", help="write or check the launch configuration",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=["default", "validate"], help="no action: ask questions")
    parser.add_argument("file", nargs="?", help="with validate: the file to check")
    parser.add_argument("--config_file", "--config-file", default=None,
                        help=f"where to write (default: ${launch_config.CONFIG_ENV} or {launch_config.DEFAULT_CONFIG})")
    parser.add_argument("--cpu", action="store_true", help="with default: a CPU-only configuration")
    parser.add_argument("--mixed_precision", "--mixed-precision", default="no", choices=precision_names())
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check a file, or write one from the questions' answers (or what this machine has)."""
    if args.action == "validate":
        if not args.file:
            raise CliError("config validate needs the file to check: trainer config validate FILE.")
        config = launch_config.with_defaults(launch_config.load(args.file))
        print(f"{args.file}: valid ({config['distributed_type']}, {config['num_processes']} process(es))")
        return 0
    if args.file:
        raise CliError(f"{args.file!r}: only `trainer config validate FILE` takes a file; "
                       f"to write one, pass --config_file {args.file}.")
    try:
        config = detected(args.cpu, args.mixed_precision) if args.action == "default" else questionnaire(_ask)
    except EOFError:
        raise CliError("the answers ended before the questions did; nothing was written.") from None
    path = launch_config.save(config, args.config_file or launch_config.default_config_path())
    print(f"configuration saved at {path}")
    return 0


def detected(cpu: bool, mixed_precision: str) -> dict[str, Any]:
    """One machine, every accelerator found (or one process on the CPU)."""
    kind = None if cpu else accelerator_type()
    count = torch.accelerator.device_count() if kind else 1
    distributed = "NO" if count == 1 or kind is None else f"MULTI_{kind.upper()}"
    if distributed not in registry.distributed_types():
        distributed = "MULTI_GPU"
    return {"compute_environment": "LOCAL_MACHINE", "distributed_type": distributed, "mixed_precision": mixed_precision,
            "num_machines": 1, "num_processes": count, "machine_rank": 0, "use_cpu": kind is None,
            "rdzv_backend": "static", "main_training_function": "main"}


def _ask(prompt: str) -> str:
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.strip()


def _choice(ask: Callable[[str], str], question: str, choices: list[Any], default: Any) -> Any:
    shown = "/".join(str(c) for c in choices)
    while True:
        answer = ask(f"{question} ({shown}) [{default}]: ") or str(default)
        for choice in choices:
            if answer.lower() == str(choice).lower():
                return choice
        print(f"Please answer with one of: {shown}.")


def _number(ask: Callable[[str], str], question: str, default: int, least: int = 0) -> int:
    while True:
        answer = ask(f"{question} [{default}]: ") or str(default)
        if answer.isdigit() and int(answer) >= least:
            return int(answer)
        print(f"Please answer with a whole number >= {least}.")


def _yes(ask: Callable[[str], str], question: str, default: bool) -> bool:
    return _choice(ask, question, ["yes", "no"], "yes" if default else "no") == "yes"


def questionnaire(ask: Callable[[str], str]) -> dict[str, Any]:
    """Ask, one question a line, what ``trainer launch`` needs to know."""
    config: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "main_training_function": "main"}
    kind = _choice(ask, "Which kind of machine/parallelism?", list(registry.distributed_types()), "NO")
    config["distributed_type"] = kind
    config["num_machines"] = _number(ask, "How many machines?", 1, least=1)
    if config["num_machines"] > 1:
        config["machine_rank"] = _number(ask, "The rank of this machine?", 0)
        config["main_process_ip"] = ask("The IP address of machine 0: ") or None
        config["main_process_port"] = _number(ask, "The port of machine 0?", 29500, least=1)
        config["rdzv_backend"] = _choice(ask, "Rendezvous backend?", ["static", "c10d"], "static")
    default_processes = 1 if kind == "NO" else 2
    config["num_processes"] = _number(ask, "How many processes in total (all machines)?", default_processes, least=1)
    config["use_cpu"] = _yes(ask, "Run on the CPU only?", accelerator_type() is None)
    config["mixed_precision"] = _choice(ask, "Mixed precision?", list(precision_names()), "no")
    strategy = registry.strategy_for_distributed_type(kind)
    section = _strategy_questions(ask, strategy)
    if section and strategy.spec.section is not None:
        config[strategy.spec.section] = section
    return launch_config.validate(config)


def _strategy_questions(ask: Callable[[str], str], strategy: type[Strategy]) -> dict[str, Any]:
    """The questions a strategy's options declare, answered: its section of the configuration."""
    defaults = strategy.option_defaults()
    answers: dict[str, Any] = {}
    for option in strategy.spec.options:
        if option.question is None:
            continue
        default = option.ask_default if option.ask_default is not None else defaults.get(option.key)
        if option.choices:
            answers[option.key] = _choice(ask, option.question, [c for c in option.choices if isinstance(c, type(default))]
                                          or list(option.choices), default)
        elif bool in option.types:
            answers[option.key] = _yes(ask, option.question, bool(default))
        elif int in option.types:
            answers[option.key] = _number(ask, option.question, int(default or 0), least=int(option.minimum or 0))
        else:
            answers[option.key] = ask(f"{option.question} [{default}]: ") or default
    return answers
