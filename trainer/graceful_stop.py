"""Stopping on a signal without losing the run: SIGTERM, SIGINT, and a cluster's preemption signal.

While ``fit`` runs, these signals only set a flag. At the next optimizer step (every process
agrees on which) the Trainer writes a checkpoint, points ``latest`` at it, lets callbacks and
trackers close with an ``interrupted`` status, and raises ``TrainingInterrupted``: a
``SystemExit`` whose code is 128 + the signal's number, as a process killed by it would report.
A second signal stops at once (``KeyboardInterrupt`` for Ctrl-C). Under SLURM the preemption
signal (``sbatch --signal=USR1@90``) also requeues the job, which then resumes from ``latest``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT")


class TrainingInterrupted(SystemExit):
    """``fit`` stopped on a signal after saving a checkpoint; the exit code is 128 + the signal's number."""

    def __init__(self, signum: int, checkpoint: Any) -> None:
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint

    def __str__(self) -> str:
        return (f"Training stopped on {signal.Signals(self.signum).name} after saving {self.checkpoint}: "
                "fit(resume='latest') continues from it.")


def as_signal(value: str | int) -> int:
    """A signal's number from its name (``"SIGUSR1"``, ``"USR1"``) or number, with one error naming the valid ones."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(signal.Signals(value))
    name = str(value).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if not hasattr(signal, name) or not isinstance(getattr(signal, name), signal.Signals):
        valid = ", ".join(s.name for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP))
        raise ValueError(f"{value!r} is not a signal name: use one such as {valid}.")
    return int(getattr(signal, name))


class StopSignals:
    """Turns the given signals into a request to stop at the next optimizer step, while ``fit`` runs."""

    def __init__(self, signals: tuple[str | int, ...] = DEFAULT_SIGNALS, preemption: str | int | None = None) -> None:
        self.signals = tuple(dict.fromkeys(as_signal(s) for s in signals))
        self.preemption = as_signal(preemption) if preemption is not None else None
        self.received: int | None = None  # the first signal this process received in this fit
        self.by_agreement = False  # several processes: stop on ``agreed``, set at each optimizer step
        self.agreed: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = self.agreed = None
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (*self.signals, *([self.preemption] if self.preemption is not None else [])):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second signal: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = signum

    def requested(self) -> int | None:
        """The signal to stop on after this optimizer step, or None.

        On one process, the one received; on several, the largest any of them had received when
        they last agreed (once per optimizer step, before it), so that all stop at the same step.
        """
        return self.agreed if self.by_agreement else self.received

    def requeue(self, signum: int) -> str | None:
        """Under SLURM, requeue the job after the preemption signal; return what was done (None: nothing)."""
        job = os.environ.get("SLURM_JOB_ID")
        if signum != self.preemption or not job:
            return None
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode != 0:
            return f"scontrol requeue {job} failed: {done.stderr.strip() or done.returncode}"
        return f"requeued SLURM job {job}"
