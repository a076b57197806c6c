"""The one summary a failed launch ends with: each failed process, how it ended and where its traceback is.

torchrun's agent reports a failed run as a ``ChildFailedError`` holding one ``ProcessFailure``
per process that ended badly on this machine (the one that failed and those the agent then
stopped). Each becomes one :class:`RankFailure`; :func:`summary` writes them as lines such as

    trainer launch: rank 1 failed and the other process on this machine was stopped.
      rank 1 (local rank 1, pid 4392): exit code 1, RuntimeError: rank 1 fails on purpose; traceback above and
      in /tmp/torchelastic_x/.../attempt_0/1/error.json.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.cli.errors import one_line

_MESSAGE_LIMIT = 240  # characters of an exception's message in the summary; the file has all of it
_KILLED = ("no traceback: it was killed from outside the script (the out-of-memory killer, `kill -9`, a scheduler "
           "ending the job)")
_CRASHED = "no Python traceback: the process crashed; faulthandler's stack of each thread is above"


@dataclass(frozen=True)
class RankFailure:
    """How one process of the launch ended."""

    rank: int
    local_rank: int
    pid: int
    exitcode: int
    message: str  # the exception's type and message, one line; "" when the process raised none
    error_file: str | None  # the file holding the traceback, when the process wrote one

    @property
    def signal_name(self) -> str | None:
        """``SIGKILL`` for a process a signal ended, else None."""
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"

    def describe(self) -> str:
        """``rank 3 (local rank 1, pid 77): killed by SIGKILL, no traceback: ...``."""
        head = f"rank {self.rank} (local rank {self.local_rank}, pid {self.pid}): "
        name = self.signal_name
        if name in ("SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"):
            return head + f"killed by {name}, {_KILLED}."
        if name is not None:
            return head + f"ended by {name}, {_CRASHED}."
        what = f"exit code {self.exitcode}"
        if self.message:
            what += f", {self.message}"
        if self.error_file:
            return head + f"{what}; traceback above and in {self.error_file}."
        return head + f"{what}; no Python exception was recorded (the script exited with this code); its output is above."


def from_child_failures(failures: Mapping[int, Any]) -> list[RankFailure]:
    """One RankFailure per ``ProcessFailure`` of torchrun's ``ChildFailedError.failures`` (global rank -> failure)."""
    found = []
    for rank, failure in sorted(failures.items()):
        data = failure.message if isinstance(failure.message, dict) else {}
        message = one_line(data.get("message", "")) if data else ""
        if len(message) > _MESSAGE_LIMIT:
            message = message[:_MESSAGE_LIMIT - 3] + "..."
        error_file = failure.error_file if data and os.path.isfile(str(failure.error_file)) else None
        found.append(RankFailure(rank=int(rank), local_rank=int(failure.local_rank), pid=int(failure.pid),
                                 exitcode=int(failure.exitcode), message=message, error_file=error_file))
    return found


def _stopped_by_the_launcher(failure: RankFailure, others: list[RankFailure]) -> bool:
    """A SIGTERM'd process while another one failed on its own: the agent stopped it."""
    return failure.signal_name == "SIGTERM" and any(other.signal_name != "SIGTERM" for other in others)


def summary(failures: list[RankFailure], processes: int, machine_rank: int = 0, machines: int = 1) -> str:
    """The lines a failed launch ends with (the first starts with ``trainer launch:``)."""
    failed = [f for f in failures if not _stopped_by_the_launcher(f, failures)]
    stopped = processes - len(failed)
    where = f"on machine {machine_rank} (of {machines})" if machines > 1 else "on this machine"
    ranks = ", ".join(str(f.rank) for f in failed)
    head = (f"trainer launch: rank {ranks} failed" if len(failed) == 1
            else f"trainer launch: {len(failed)} processes failed {where} (ranks {ranks})")
    if stopped > 0:
        others = "the other process" if stopped == 1 else f"the other {stopped} processes"
        head += f" and {others} {where} {'was' if stopped == 1 else 'were'} stopped"
    lines = [head + ":"] + ["  " + failure.describe() for failure in failed]
    if machines > 1 or len(failed) > 1:
        lines.append("  A process that loses a peer fails too (\"Connection closed by peer\", a timeout): the first "
                     "failure is the cause" + (", and it may be in another machine's summary." if machines > 1 else "."))
    return "\n".join(lines)
