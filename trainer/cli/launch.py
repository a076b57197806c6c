"""``trainer launch``: run a script on one process, several, several machines, or under SLURM.

Everything that can be checked is checked first (``launch_checks``): the configuration, the
layout of machines and ranks, the script, a busy port; a mistake is one ``CliError`` line. Then
one process runs the script directly. Several run under ``torch.distributed.run`` (torchrun),
called rather than re-written, in this process (``launch_torchrun``): its elastic agent starts
the workers and, when one fails, stops the others; the launch ends with one summary of the
failed processes (``launch_summary``). ``--max_restarts`` starts a fresh torchrun on one machine
(and uses torchrun's own restarts across machines). Inside an ``srun`` job step each task is
already one process, so the script runs directly and ``PartialState`` reads SLURM's variables.

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
from trainer.cli import launch_checks, launch_compat
from trainer.cli.errors import CliError
from trainer.cli.launch_summary import summary
from trainer.cli.launch_torchrun import Outcome, check_runnable, run_torchrun, torchrun_argv
from trainer.cluster import inside_srun
from trainer.precision.names import precision_names
from trainer.strategies import registry
from trainer.strategies.spec import Option, StrategySpec, describe_types


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("launch", help="run a training script on one or more processes",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # a script's --config is not our --config_file
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


def run(args: argparse.Namespace) -> int:
    """Check everything, then run the script on one process, under torchrun, or as this srun task."""
    refused = launch_compat.refusal(args)
    if refused:
        raise CliError(refused)
    config = settings(args)
    launch_checks.check_layout(config)
    check_runnable(args.script, args.module, args.no_python)
    try:  # a strategy whose package is missing fails once, here, before any process starts
        registry.check_strategy_requirements(launch_config.strategy_spec(config).name)
    except ImportError as error:
        raise CliError(str(error)) from None
    directly = config["num_processes"] == 1 or inside_srun(os.environ)
    if not directly:
        launch_checks.check_port(config)
    for warning in launch_checks.environment_warnings(config):
        print(warning, file=sys.stderr)
    os.environ.update(launch_config.process_environment(config))
    os.environ.update(launch_compat.environment(args, config))
    command = _command(args)
    if directly:
        return _run_directly(command if args.no_python else [sys.executable, *command])
    return _run_torchrun(args, config, command)


def _run_torchrun(args: argparse.Namespace, config: dict[str, Any], command: list[str]) -> int:
    """Several processes: torchrun, restarted here on one machine, by its own agents on several."""
    if config["num_machines"] > 1 and config["rdzv_backend"] == "c10d" and config.get("max_restarts", 0) > 0:
        # Restarted processes then meet in a fresh store of their own: in the agent's shared store they would
        # read the addresses of the processes that died (torchrun keeps it across restarts).
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    argv = torchrun_argv(config, command, launch_compat.torchrun_arguments(args), no_python=args.no_python)
    per_machine = config["num_processes"] // config["num_machines"]
    if "OMP_NUM_THREADS" not in os.environ and per_machine > 1:
        print(f"trainer launch: each of the {per_machine} processes on this machine uses one CPU thread "
              "(OMP_NUM_THREADS=1, torchrun's default); --num_cpu_threads_per_process sets another number.",
              file=sys.stderr)
    # On one machine a restart is a fresh torchrun (new agent, new rendezvous, new ports): restarting workers
    # inside one agent can leave the new processes talking to the old ones' state.
    attempts = 1 + (config.get("max_restarts", 0) if config["num_machines"] == 1 else 0)
    outcome = Outcome(1)
    for attempt in range(attempts):
        os.environ[variables.RESTART_COUNT] = str(attempt)
        outcome = run_torchrun(argv)
        if outcome.code == 0:
            return 0
        _report(outcome, config)
        left = attempts - attempt - 1
        if outcome.code > 128:  # the launch itself was stopped (SIGTERM, Ctrl-C): no restart
            return outcome.code
        if left:
            print(f"trainer launch: restarting every process ({left} restart(s) left).", file=sys.stderr)
    return outcome.code


def _run_directly(command: list[str]) -> int:
    """Run one process in the foreground; Ctrl-C reaches it (same process group) and ends the launch with it."""
    process = subprocess.Popen(command)
    while True:
        try:
            code = process.wait()
            return 128 - code if code < 0 else code  # a signal's end as the shell shows it (SIGKILL: 137)
        except KeyboardInterrupt:
            continue  # the script got the same SIGINT: let it finish what it does on Ctrl-C


def _report(outcome: Outcome, config: dict[str, Any]) -> None:
    machines = config["num_machines"]
    if outcome.failures:
        text = summary(outcome.failures, config["num_processes"] // machines, config["machine_rank"], machines)
    elif outcome.lost_rendezvous and machines > 1:
        text = (f"trainer launch: machine {config['machine_rank']} lost the rendezvous at {config['main_process_ip']}:"
                f"{config['main_process_port'] or launch_checks.DEFAULT_MULTI_MACHINE_PORT} ({outcome.reason}): the "
                "launcher that holds it has ended or cannot be reached, and this machine's processes were stopped; "
                "the other machines' summaries name the failed process.")
    elif outcome.lost_rendezvous:
        text = f"trainer launch: the rendezvous failed ({outcome.reason}); the processes were stopped."
    else:
        text = f"trainer launch: {outcome.reason}"
    print(text, file=sys.stderr, flush=True)
