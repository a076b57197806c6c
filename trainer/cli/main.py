"""``trainer <command>``: one entry point, one module per command.

Every command stops on bad input the same way, here: one line ``trainer <command>: <reason>`` on
stderr and exit status 2, never a traceback. A command raises ``CliError`` (or ``ConfigError``
for a launch configuration); a command-line mistake is argparse's usage error, shortened to one
line with a did-you-mean.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any, NoReturn

from trainer.cli import config_cmd, env, estimate_memory, fit, launch, merge_weights
from trainer.cli.errors import USAGE_ERROR, USER_ERRORS, report


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (no usage block) and a did-you-mean for a wrong choice."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: <message>. See `<prog> --help`.`` and exit with status 2."""
        end = " " if message.endswith((".", "?", "!")) else ". "
        self.exit(USAGE_ERROR, f"{self.prog}: {message}{end}See `{self.prog} --help`.\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is not None and value not in choices:
            names = [str(choice) for choice in choices]
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise argparse.ArgumentError(action, f"{value!r} is not one of {', '.join(names)}.{hint}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="trainer", description="Train and run PyTorch models anywhere.")
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    config_cmd.register(commands)
    env.register(commands)
    estimate_memory.register(commands)
    fit.register(commands)
    launch.register(commands)
    launch.register_test(commands)
    merge_weights.register(commands)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, command: str | None, unknown: list[str]) -> NoReturn:
    """The command's own usage error for options it does not have, with the closest of its options."""
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    command_parser: argparse.ArgumentParser = commands.choices.get(command, parser) if command else parser
    options = [option for action in command_parser._actions for option in action.option_strings]
    close = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    command_parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (2 when its input cannot be used)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unrecognized(parser, args.command, unknown)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        return report(args.command, error)
    except KeyboardInterrupt:
        print(f"trainer {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
