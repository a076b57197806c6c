"""The Tracker interface: one experiment-tracking backend, usable from the Trainer and the Accelerator.

A tracker is a Callback, so on the Trainer's bus it starts itself at ``on_fit_start`` (with the
run configuration), sends what ``trainer.log`` recorded after each optimizer step and each
validation, and finishes at the end of ``fit``. At the low-code level the Accelerator calls the
same public methods directly (``start``, ``log``, ``finish``).

Backends implement the underscored methods (``_start``, ``_log``, ``_finish`` and, where the
backend has them, ``_log_images``, ``_log_table``, ``_log_artifact``). The public methods wrap
them so that a backend that cannot be reached, or raises, costs one warning and switches that
tracker off: training goes on (``on_error="raise"`` stops instead).

A backend whose calls are slow (creating a store, talking to a server) sets ``background``: its
calls then run, in order, on a thread of the tracker's own, so that training does not wait for
the run to start or for values to be written; ``finish`` waits until everything is written. An
error met there is reported (the warning, or the error with ``on_error="raise"``) at the next
call from the training thread, and at the latest by ``finish``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..base import Callback

if TYPE_CHECKING:
    from ..protocols import TrainerView

ON_ERROR = ("warn", "raise")
# Backend methods with a default in Tracker (a no-op, or NotImplementedError naming what is missing).
OPTIONAL = ("_store_config", "_log_images", "_log_table", "_log_artifact", "_flush", "_finish")
SEND_AT_MOST = 1000  # logged values that wait for send_every before the bus sends them anyway


class TrackerPackageMissing(ImportError):
    """A tracker's package is not installed; the message carries the ``pip install`` line."""


def require_package(module: str, extra: str, tracker: str) -> None:
    """Raise one clear error, with the install line, when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise TrackerPackageMissing(
            f"The {tracker!r} tracker needs the {module!r} package, which is not installed. "
            f"Install it with: pip install 'trainer-kit[{extra}]'"
        )


@contextlib.contextmanager
def env_default(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of the block, unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def is_main_process() -> bool:
    """Rank 0 of the default process group (or of the launcher's environment before it exists)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def plain_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors and numpy scalars as Python numbers; other values (strings, images) as they are."""
    plain = {}
    for name, value in values.items():
        if torch.is_tensor(value) and value.numel() == 1 or hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            value = value.item()
        plain[name] = value
    return plain


def scalars(values: Mapping[str, Any]) -> dict[str, float | int]:
    """Only the numeric values (bools excluded), for backends that take nothing else."""
    return {k: v for k, v in plain_values(values).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker(Callback):
    """One experiment-tracking backend.

    Args:
        logging_dir: where local files go (default: the Trainer's ``output_dir``, or the
            Accelerator's ``project_dir``, or the working directory).
        run_name: the run's display name, where the backend has one.
        main_process_only: log from process 0 only (the default); False logs from every process.
        on_error: ``"warn"`` (one warning, the tracker switches off, training goes on) or ``"raise"``.
        send_every: on the Trainer's bus, seconds between sends of what ``trainer.log`` recorded
            (checked when a value is logged; each value keeps its step; everything is sent at every
            validation, epoch end and finish). Sending on every logged step would cost more than a short step.
    """

    name: ClassVar[str] = ""
    background = False  # run the backend's calls on a thread of the tracker's own (see the module docstring)
    requires: ClassVar[str | None] = None  # the module the backend imports
    extra: ClassVar[str] = ""  # the pip extra that installs it

    def __init__(self, *, logging_dir: str | os.PathLike | None = None, run_name: str | None = None,
                 main_process_only: bool = True, on_error: str = "warn", send_every: float = 2.0) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use one of {ON_ERROR}.")
        if isinstance(send_every, bool) or not isinstance(send_every, (int, float)) or send_every < 0:
            raise ValueError(f"send_every={send_every!r}: use a number of seconds >= 0 (0 sends at every log).")
        if self.requires is not None:
            require_package(self.requires, self.extra, self.name)
        self.logging_dir = Path(logging_dir) if logging_dir is not None else None
        self.run_name = run_name
        self.main_process_only = main_process_only
        self.on_error = on_error
        self.run: Any = None  # the backend's own run object, once started
        self.run_id: str | None = None  # kept in checkpoints so a resumed fit continues the same run
        self.failed = False
        self.started = False
        self.send_every = send_every
        self._sent = 0  # the Trainer's log sequence number last sent
        self._next_send = 0.0  # time.monotonic() from which the bus sends again
        self._worker: ThreadPoolExecutor | None = None  # with ``background``, while a run is open
        self._worker_error: tuple[str, Exception] | None = None  # what the worker met, until reported

    # -- what a backend implements -------------------------------------------------------------
    def _start(self, project_name: str, config: dict[str, Any], logging_dir: Path, **init_kwargs: Any) -> Any:
        """Open the run with its configuration, files under ``logging_dir``; return the backend's run object.

        Called once, by ``start`` (the Trainer's ``on_fit_start``, or ``accelerator.init_trackers``).
        """
        raise NotImplementedError

    def _log(self, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        """Record ``values`` (numbers as Python numbers; strings as they are) at ``step``; every backend implements it."""
        raise NotImplementedError

    def _store_config(self, config: dict[str, Any]) -> None:
        """Record (more) run configuration after the start; backends without it ignore the call."""

    def _log_images(self, images: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        """Record images (``{name: array or tensor}``) at ``step``, where the backend can."""
        raise NotImplementedError(f"The {self.name!r} tracker does not record images.")

    def _log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None, **kwargs: Any) -> None:
        """Record a table called ``name`` (column names, rows) at ``step``, where the backend can."""
        raise NotImplementedError(f"The {self.name!r} tracker does not record tables.")

    def _log_artifact(self, path: Path, name: str | None, **kwargs: Any) -> None:
        """Store the file or folder at ``path`` with the run, where the backend can."""
        raise NotImplementedError(f"The {self.name!r} tracker does not record artifacts.")

    def _flush(self) -> None:
        """Send what the backend buffered (backends that batch their writes implement it)."""

    def _finish(self, status: str) -> None:
        """Close the run (sending anything buffered); ``status`` is ``"success"``, ``"failed"`` or ``"interrupted"``."""

    # -- the public, guarded surface -------------------------------------------------------------------
    @property
    def tracker(self) -> Any:
        """The backend's native run object (``None`` before the start or off the main process)."""
        self._wait_for_start()
        return self.run

    @property
    def active(self) -> bool:
        """Whether calls reach the backend: not switched off, and on a process that logs."""
        return not self.failed and (not self.main_process_only or is_main_process())

    def start(self, project_name: str = "trainer", config: Mapping[str, Any] | None = None,
              logging_dir: str | os.PathLike | None = None, **init_kwargs: Any) -> None:
        """Open the run (once; later calls only add configuration)."""
        if self.started:
            if config:
                self._guard("store the configuration", self._store_config, dict(config))
            return
        self.started = True
        directory = Path(self.logging_dir or logging_dir or Path.cwd())
        if self.background and self.active:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tracker-{self.name}")
            self._guard("start", self._start_run, project_name, dict(config or {}), directory, init_kwargs)
            return
        self.run = self._guard("start", self._start, project_name, dict(config or {}), directory, **init_kwargs)

    def _start_run(self, project_name: str, config: dict[str, Any], directory: Path, init_kwargs: dict[str, Any]) -> None:
        self.run = self._start(project_name, config, directory, **init_kwargs)

    def _wait_for_start(self) -> None:
        """With ``background``: wait until the run has started (its id and native object exist)."""
        if self._worker is not None:
            self._worker.submit(lambda: None).result()
            self._report_worker_error()

    def store_init_configuration(self, config: Mapping[str, Any]) -> None:
        """Record (more) run configuration on a started run."""
        self._guard("store the configuration", self._store_config, dict(config))

    def log(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Record ``values`` at ``step`` (tensors and numpy scalars become numbers): ``accelerator.log`` and the bus call it."""
        self._guard("log", self._log, plain_values(values), step, **kwargs)

    def log_images(self, images: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Images as ``{name: HxWxC or CxHxW array/tensor}``."""
        self._guard("log images", self._log_images, dict(images), step, **kwargs)

    def log_table(self, name: str, columns: list[str] | None = None, data: list[list[Any]] | None = None,
                  dataframe: Any = None, step: int | None = None, **kwargs: Any) -> None:
        """A table as ``columns`` and rows of ``data``, or a pandas ``dataframe``."""
        if dataframe is not None:
            columns, data = [str(c) for c in dataframe.columns], dataframe.values.tolist()
        if columns is None or data is None:
            raise ValueError("log_table needs columns= and data= (a list of rows), or dataframe=.")
        self._guard("log a table", self._log_table, name, list(columns), [list(row) for row in data], step, **kwargs)

    def log_artifact(self, path: str | os.PathLike, name: str | None = None, **kwargs: Any) -> None:
        """A file or folder stored with the run."""
        self._guard("log an artifact", self._log_artifact, Path(path), name, **kwargs)

    def flush(self) -> None:
        """Send what the backend holds back for batching (done at every validation and epoch end)."""
        self._guard("flush", self._flush)

    def finish(self, status: str = "success") -> None:
        """Close the run (``"success"`` or ``"failed"``): at the end of ``fit`` and by ``accelerator.end_training``.

        Returns once everything sent is written.
        """
        if self.started and (self.run is not None or self._worker is not None):
            self._guard("finish", self._finish, status)
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
            self._report_worker_error()
        self.started = False
        self.run = None

    def _guard(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.active or (what != "start" and not self.started):
            return None
        if self._worker is not None:
            self._report_worker_error()
            name = getattr(call, "__name__", "")
            if name in OPTIONAL and getattr(call, "__func__", None) is getattr(Tracker, name):
                return call(*args, **kwargs)  # not implemented by the backend: nothing to do, or NotImplementedError now
            self._worker.submit(self._in_worker, what, call, args, kwargs)
            return None
        try:
            return call(*args, **kwargs)
        except NotImplementedError:
            raise
        except Exception as error:
            self._switch_off(what, error)
            return None

    def _in_worker(self, what: str, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._worker_error is not None:  # switched off: what was queued after the failure is dropped
            return
        try:
            call(*args, **kwargs)
        except Exception as error:
            self._worker_error = (what, error)

    def _report_worker_error(self) -> None:
        """In the calling thread: report a failure the worker met (once)."""
        if self._worker_error is not None and not self.failed:
            if self.on_error == "raise":
                self.failed = True  # raised once, here; the worker drops what was queued after it
            self._switch_off(*self._worker_error)

    def _switch_off(self, what: str, error: Exception) -> None:
        if self.on_error == "raise":
            raise error
        self.failed = True
        warnings.warn(
            f"The {self.name!r} tracker could not {what} ({type(error).__name__}: {error}). It is switched off "
            "for the rest of this run and training goes on; pass on_error='raise' to stop instead.",
            RuntimeWarning, stacklevel=4,
        )

    # -- on the Trainer's bus ------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """``tracker:<name>``: one state per tracker kind in checkpoints."""
        return f"tracker:{self.name or type(self).__qualname__}"

    def state_dict(self) -> dict[str, Any]:
        """The run's id, so that ``fit(resume=...)`` continues the same run."""
        self._wait_for_start()
        return {"run_id": self.run_id} if self.run_id is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the saved run id back (the run is continued when it starts)."""
        self.run_id = state.get("run_id", self.run_id)

    def handles(self, event: str) -> bool:
        """Only on the processes that log: with ``main_process_only``, the others skip every event."""
        return not self.main_process_only or is_main_process()

    def on_fit_start(self, trainer: TrainerView) -> None:
        """Start the run with the trainer's project, run name and configuration."""
        self.run_name = self.run_name or trainer.run_name
        self.start(trainer.project, trainer.run_config(), trainer.output_dir, **self._init_kwargs(trainer))

    def on_log(self, trainer: TrainerView, values: dict[str, float]) -> None:
        """Send what ``trainer.log`` recorded since the last send, once ``send_every`` seconds have passed
        since it or 1000 values wait (before the run has started, they wait for the next send)."""
        waiting = trainer.log_sequence - self._sent
        if self.started and (waiting >= SEND_AT_MOST or time.monotonic() >= self._next_send):
            self._send(trainer)

    def on_train_epoch_end(self, trainer: TrainerView) -> None:
        """Send the new values and flush what the backend batches."""
        self._send(trainer)
        self.flush()

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        """Send the metrics; a ``validate`` outside ``fit`` is a run of its own, started and finished here."""
        self._evaluated(trainer)

    def on_test_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        """Send the ``test_`` metrics: into the fit's run during ``fit``, else into a run of their own."""
        self._evaluated(trainer)

    def _evaluated(self, trainer: TrainerView) -> None:
        if not self.started:  # evaluation called on its own, outside fit
            self.run_name = self.run_name or trainer.run_name
            self.start(trainer.project, trainer.run_config(), trainer.output_dir, **self._init_kwargs(trainer))
        self._send(trainer)
        if trainer.fitting:
            self.flush()
        else:
            self.finish()

    def on_fit_end(self, trainer: TrainerView) -> None:
        """Send the last values and finish the run as a success."""
        self._send(trainer)
        self.finish("success")

    def on_exception(self, trainer: TrainerView, exception: BaseException) -> None:
        """Send the last values and finish the run: ``"interrupted"`` after a signal or Ctrl-C, else ``"failed"``."""
        self._send(trainer)
        self.finish("interrupted" if isinstance(exception, (KeyboardInterrupt, SystemExit)) else "failed")

    def _init_kwargs(self, trainer: TrainerView) -> dict[str, Any]:
        return {}

    def _send(self, trainer: TrainerView) -> None:
        self._next_send = time.monotonic() + self.send_every
        self._sent, by_step = trainer.logged_since(self._sent)
        for step, values in by_step.items():
            self.log(values, step=step)
