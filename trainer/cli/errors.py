"""The one way a ``trainer`` command stops on bad input: one line on stderr and exit status 2.

Each command raises :class:`CliError` (or ``trainer.config.ConfigError`` for a launch
configuration) with a message that names the file, key or flag, what is wrong and the fix;
``trainer.cli.main.main`` prints it as ``trainer <command>: <message>`` and returns 2. No
command prints a traceback for a mistake in what it was given.
"""

from __future__ import annotations

import sys

from trainer.config import ConfigError

USAGE_ERROR = 2  # the exit status of a command that could not start, as argparse uses for its usage errors


class CliError(ValueError):
    """Input a command cannot use; the message is one or two sentences for the user."""


# What main() reports as one line: the commands' own errors and the launch configuration's.
USER_ERRORS: tuple[type[Exception], ...] = (CliError, ConfigError)


def one_line(error: BaseException | str) -> str:
    """The message on one line (a multi-line message from a library is joined with spaces)."""
    return " ".join(str(error).split())


def report(command: str, error: BaseException | str) -> int:
    """Print ``trainer <command>: <message>`` on stderr; return the usage-error status."""
    print(f"trainer {command}: {one_line(error)}", file=sys.stderr)
    return USAGE_ERROR
