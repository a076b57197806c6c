"""Running a command (a launch of a test script) from a test, with its output streamed and kept."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO


@dataclass
class RunOutput:
    """What a command left: its exit status and its output lines (without line ends)."""

    returncode: int
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


class SubprocessCallException(Exception):
    """``run_command``'s command failed; the message holds its output."""


def _pump(pipe: IO[bytes], sink: list[str], echo_to: TextIO | None, label: str) -> None:
    for raw in iter(pipe.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        sink.append(line)
        if echo_to is not None:
            print(label, line, file=echo_to)
    pipe.close()


def execute_subprocess_async(cmd: list[Any], env: Mapping[str, str] | None = None, stdin: Any = None,
                             timeout: float | None = 180, quiet: bool = False, echo: bool = True) -> RunOutput:
    """Run ``cmd``, printing its stdout/stderr lines as they come (unless ``quiet``), and return them.

    ``Path`` items of ``cmd`` become strings (in place, as the list is reused by callers). ``echo`` prints the
    command first. A command that exits with a positive status raises ``RuntimeError`` with its stderr; one
    still running after ``timeout`` seconds is killed and raises too.
    """
    for i, part in enumerate(cmd):
        if isinstance(part, Path):
            cmd[i] = str(part)
    text = " ".join(map(str, cmd))
    if echo:
        print("\nRunning: ", text)
    process = subprocess.Popen(list(map(str, cmd)), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(env) if env is not None else None)
    output = RunOutput(returncode=0)
    assert process.stdout is not None and process.stderr is not None
    readers = [threading.Thread(target=_pump, args=(process.stdout, output.stdout, None if quiet else sys.stdout,
                                                    "stdout:"), daemon=True),
               threading.Thread(target=_pump, args=(process.stderr, output.stderr, None if quiet else sys.stderr,
                                                    "stderr:"), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        output.returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"'{text}' did not finish within {timeout} s") from None
    finally:
        for reader in readers:
            reader.join()
    if output.returncode > 0:
        stderr = "\n".join(output.stderr)
        raise RuntimeError(f"'{text}' failed with returncode {output.returncode}\n\n"
                           f"The combined stderr from workers follows:\n{stderr}")
    return output


def run_command(command: list[Any], return_stdout: bool = False, env: Mapping[str, str] | None = None) -> str | None:
    """Run ``command`` (stderr folded into stdout); return that output when ``return_stdout``.

    A failing command raises ``SubprocessCallException`` carrying its output.
    """
    for i, part in enumerate(command):
        if isinstance(part, Path):
            command[i] = str(part)
    try:
        output = subprocess.check_output(list(map(str, command)), stderr=subprocess.STDOUT,
                                         env=dict(env) if env is not None else os.environ.copy())
    except subprocess.CalledProcessError as error:
        raise SubprocessCallException(
            f"Command `{' '.join(map(str, command))}` failed with the following error:\n\n{error.output.decode()}"
        ) from error
    return output.decode("utf-8") if return_stdout else None
