"""One run per output folder: a lock file naming the process and host that holds the folder.

The main process of a job takes the lock for the whole job (the other processes share it and
only learn whether it was taken); a second live run on the same folder is refused at the start
of ``fit``, naming the first. A lock left by a process that no longer runs on this host is taken
over with a warning.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import psutil

LOCK_NAME = ".trainer.lock"


class OutputDirLockedError(RuntimeError):
    """Another live run holds the output folder."""


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunLock:
    """The lock on ``output_dir``: ``acquire()`` at the start of a run, ``release()`` at its end."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def _mine(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self) -> None:
        """Take the lock, or raise ``OutputDirLockedError`` naming the live run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self._mine()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_if_stale(mine):
                    continue
                return
            with os.fdopen(fd, "w") as file:
                json.dump(mine, file)
            self.held = True
            return
        raise OutputDirLockedError(f"Could not take the lock {self.path}: other runs keep changing it.")

    def _take_over_if_stale(self, mine: dict[str, Any]) -> bool:
        """True once the lock is ours; raises if a live run holds it; False to try creating it again."""
        holder = _read(self.path)
        if holder is None:  # being written right now, or damaged: look again, then treat it as stale
            time.sleep(0.05)
            holder = _read(self.path)
        same_host = holder is not None and holder.get("host") == mine["host"]
        pid = holder.get("pid") if holder is not None else None
        if holder is not None and same_host and pid == mine["pid"]:
            self.held = True  # this process holds it already (a second fit in the same run)
            return True
        if holder is not None and (not same_host or (isinstance(pid, int) and psutil.pid_exists(pid))):
            raise OutputDirLockedError(
                f"The output folder {self.path.parent} is in use by another run (process {pid} on host "
                f"{holder.get('host')}, started {holder.get('started')}): two runs writing to one folder would mix "
                f"their checkpoints. Give this run another output_dir, or wait for that one to end (if it is no longer "
                f"running, delete {self.path})."
            )
        warnings.warn(f"Taking over {self.path}: the run that held it (process {pid} on this host) is no longer "
                      "running.", UserWarning, stacklevel=4)
        stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, stale)  # only one taker succeeds in moving this particular file
        except FileNotFoundError:
            return False
        stale.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        """Give the folder back (only a lock this process wrote is removed)."""
        if not self.held:
            return
        self.held = False
        holder = _read(self.path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
