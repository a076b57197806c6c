"""``trainer launch``: run a script on one process, several, several machines, or under SLURM.

One process runs the script directly. Several run under ``torch.distributed.run`` (torchrun),
called rather than re-written: its elastic agent starts the workers and, when one fails, stops
the others and exits non-zero. ``--max_restarts`` starts a fresh torchrun on one machine (and
uses torchrun's own restarts across machines). Inside an
``srun`` job step each task is already one process, so the script runs directly and
``PartialState`` reads SLURM's variables.

The chosen settings reach the script as ``TRAINER_*`` environment variables, so
``Accelerator()`` and ``Trainer(strategy="auto", precision="auto")`` need no code change.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer import config as launch_config
from trainer import launch_environment as variables
from trainer.cli import launch_compat
from trainer.cluster import inside_srun
from trainer.precision.names import precision_names
from trainer.strategies import registry
from trainer.strategies.spec import Option, StrategySpec, describe_types


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("launch", help="run a training script on one or more processes",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", "--config-file", default=None,
                        help="YAML written by `trainer config` (default: the saved default config, if any)")
    parser.add_argument("--num_processes", "--num-processes", type=int, help="processes per machine x machines")
    parser.add_argument("--num_machines", "--num-machines", type=int)
    parser.add_argument("--machine_rank", "--machine-rank", type=int)
    parser.add_argument("--main_process_ip", "--main-process-ip")
    parser.add_argument("--main_process_port", "--main-process-port", type=int)
    parser.add_argument("--rdzv_backend", "--rdzv-backend", choices=["static", "c10d", "etcd", "etcd-v2"])
    parser.add_argument("--max_restarts", "--max-restarts", type=int, default=None,
                        help="restart all processes up to this many times when one fails")
    parser.add_argument("--monitor_interval", "--monitor-interval", type=float, default=None,
                        help="seconds between checks of the workers' health")
    parser.add_argument("--process_group_timeout", "--process-group-timeout", type=float, default=None,
                        help="seconds a collective waits for the other processes before the job fails")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) even where GPUs exist")
    parser.add_argument("--mixed_precision", "--mixed-precision", choices=precision_names())
    parser.add_argument("--gradient_accumulation_steps", "--gradient-accumulation-steps", type=int)
    parser.add_argument("-m", "--module", action="store_true", help="the script is a module name (python -m)")
    launch_compat.register(parser)
    parser.add_argument("script", help="the training script (or module, with -m)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    _strategy_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _strategy_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag that selects each strategy and one per option of its section, from the strategies' specs."""
    specs = registry.strategy_specs()
    choose = parser.add_argument_group("strategy", "choose one (default: the configuration's distributed_type)")
    for spec in specs:
        if spec.flag:
            choose.add_argument(*_spellings(spec.flag), action="store_true", help=spec.summary)
    for spec in specs:
        options = [option for option in spec.options if option.flag and option.argument is not None]
        if not options:
            continue
        group = parser.add_argument_group(f"{spec.name} options", f"the {spec.section} section of the configuration")
        for option in options:
            group.add_argument(*_spellings(option.key), dest=_destination(spec, option), type=_parser_of(option),
                               metavar=_metavar(option), help=option.help)


def _spellings(name: str) -> list[str]:
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def _destination(spec: StrategySpec, option: Option) -> str:
    return f"{spec.section}:{option.key}"


def _metavar(option: Option) -> str:
    if option.choices:
        return "{" + ",".join(map(str, option.choices)) + "}"
    names = {bool: "true|false", int: "N", float: "X", str: "TEXT", list: "A,B", type(None): "null"}
    return "|".join(dict.fromkeys(names.get(kind, kind.__name__) for kind in option.types))


def _parser_of(option: Option) -> Any:
    """Turn a flag's text into a value of one of the option's types (the configuration check then runs as for YAML)."""
    def parse(text: str) -> Any:
        lowered = text.strip().lower()
        if bool in option.types and lowered in ("true", "false", "yes", "no"):
            return lowered in ("true", "yes")
        if type(None) in option.types and lowered in ("null", "none"):
            return None
        for kind in (int, float):
            if kind in option.types:
                try:
                    return kind(text)
                except ValueError:
                    pass
        if str in option.types:
            return text
        if list in option.types:
            return [part.strip() for part in text.split(",") if part.strip()]
        raise argparse.ArgumentTypeError(f"expected {describe_types(option.types)}, got {text!r}")

    parse.__name__ = option.key  # argparse names the flag's type in its error
    return parse


def register_test(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("test", help="check the configured processes can train together")
    parser.add_argument("--config_file", "--config-file", default=None)
    parser.set_defaults(func=run_test)


def run_test(args: argparse.Namespace) -> int:
    """Launch the bundled self-check with the configuration, as a training script would be."""
    script = str(Path(__file__).with_name("selfcheck.py"))
    launch_args = _parser().parse_args([*(["--config_file", args.config_file] if args.config_file else []), script])
    return run(launch_args)


def _parser() -> argparse.ArgumentParser:
    return register(argparse.ArgumentParser(prog="trainer").add_subparsers())


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration file's settings, overridden by what was given on the command line."""
    path = args.config_file
    if path is None and launch_config.default_config_path().is_file():
        path = launch_config.default_config_path()
    config = dict(launch_config.load(path)) if path is not None else {}
    overrides = {"num_processes": args.num_processes, "num_machines": args.num_machines,
                 "machine_rank": args.machine_rank, "main_process_ip": args.main_process_ip,
                 "main_process_port": args.main_process_port, "rdzv_backend": args.rdzv_backend,
                 "mixed_precision": args.mixed_precision, "max_restarts": args.max_restarts,
                 "monitor_interval": args.monitor_interval, "process_group_timeout": args.process_group_timeout,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps}
    config.update({key: value for key, value in overrides.items() if value is not None})
    if args.cpu:
        config["use_cpu"] = True
    specs = registry.strategy_specs()
    chosen = [spec for spec in specs if spec.flag and getattr(args, spec.flag, False)]
    if len(chosen) > 1:
        flags = ", ".join(f"--{spec.flag}" for spec in specs if spec.flag)
        raise launch_config.ConfigError(f"Choose one of {flags}; got {', '.join(f'--{spec.flag}' for spec in chosen)}.")
    launch_compat.apply(args, config)
    for spec in specs:
        for option in spec.options:
            value = vars(args).get(_destination(spec, option))
            if value is not None and spec.section is not None:
                config[spec.section] = {**config.get(spec.section, {}), option.key: value}
    if chosen:
        config["distributed_type"] = chosen[0].distributed_types[0]
    elif config.get("use_cpu") and config.get("num_processes", 1) > 1 and config.get("distributed_type", "NO") == "NO":
        config["distributed_type"] = "MULTI_CPU"
    launch_config.validate(config)
    launch_config.check_launchable(config)
    return launch_config.with_defaults(config)


def _command(args: argparse.Namespace) -> list[str]:
    return ["-m", args.script, *args.script_args] if args.module else [args.script, *args.script_args]


def _torchrun_argv(config: dict[str, Any], command: list[str]) -> list[str]:
    machines = config["num_machines"]
    per_machine = max(1, config["num_processes"] // machines)
    argv = [f"--nproc_per_node={per_machine}", f"--nnodes={machines}", f"--node_rank={config['machine_rank']}",
            f"--monitor_interval={config.get('monitor_interval', 0.1)}"]
    if machines > 1:  # every machine's agent must agree on restarts, so torchrun's own mechanism is used
        argv.append(f"--max_restarts={config.get('max_restarts', 0)}")
    if machines == 1 and not config["main_process_port"]:
        # One machine: torchrun's standalone rendezvous (c10d on a free local port) survives restarts
        # cleanly, where a static one can hand restarted workers their predecessors' addresses.
        argv += ["--standalone"]
    elif machines == 1:
        argv += ["--master_addr=127.0.0.1", f"--master_port={config['main_process_port']}"]
    elif config["rdzv_backend"] == "static":
        if not config["main_process_ip"]:
            raise launch_config.ConfigError("Several machines need --main_process_ip (the address of machine 0).")
        argv += [f"--master_addr={config['main_process_ip']}", f"--master_port={config['main_process_port'] or 29500}"]
    else:
        endpoint = f"{config['main_process_ip'] or '127.0.0.1'}:{config['main_process_port'] or 29500}"
        argv += [f"--rdzv_backend={config['rdzv_backend']}", f"--rdzv_endpoint={endpoint}"]
    if command[0] == "-m":
        argv += ["-m", *command[1:]]
    else:
        argv += command
    return argv


def run(args: argparse.Namespace) -> int:
    refused = launch_compat.refusal(args)
    if refused:
        print(f"trainer launch: {refused}", file=sys.stderr)
        return 2
    try:
        config = settings(args)
    except launch_config.ConfigError as error:
        print(f"trainer launch: {error}", file=sys.stderr)
        return 2
    command = _command(args)
    if not args.module and not Path(args.script).is_file():
        print(f"trainer launch: no script at {args.script}.", file=sys.stderr)
        return 2
    try:  # a strategy whose package is missing fails once, here, before any process starts
        registry.check_strategy_requirements(launch_config.strategy_spec(config).name)
    except ImportError as error:
        print(f"trainer launch: {error}", file=sys.stderr)
        return 2
    os.environ.update(launch_config.process_environment(config))
    os.environ.update(launch_compat.environment(args, config))
    total = config["num_processes"] * config["num_machines"]
    if total == 1 or inside_srun(os.environ):
        return subprocess.call(command if args.no_python else [sys.executable, *command])
    # On one machine a restart is a fresh torchrun process (new agent, new rendezvous, new ports):
    # restarting workers inside one agent can leave the new processes talking to the old ones' state.
    attempts = 1 + (config.get("max_restarts", 0) if config["num_machines"] == 1 else 0)
    try:
        torchrun = [sys.executable, "-m", "torch.distributed.run", *launch_compat.torchrun_arguments(args),
                    *_torchrun_argv(config, command)]
    except launch_config.ConfigError as error:
        print(f"trainer launch: {error}", file=sys.stderr)
        return 2
    for attempt in range(attempts):
        os.environ[variables.RESTART_COUNT] = str(attempt)
        code = subprocess.call(torchrun)
        if code == 0:
            return 0
        left = attempts - attempt - 1
        print(f"trainer launch: a process failed (exit code {code}) and the others were stopped; its traceback is "
              "above (a process that lost its peers in a collective fails too: look for the first error)."
              + (f" Restarting ({left} restart(s) left)." if left else ""), file=sys.stderr)
    return 1
