"""ClearML: scalars, images, tables, artifacts and the run configuration in a ClearML Task.

Without ClearML credentials (no ``CLEARML_API_ACCESS_KEY``, no ``clearml.conf``) the Task runs in
ClearML's offline mode: everything goes to a session folder under ClearML's cache
(``~/.clearml/cache/offline/<task id>``, zipped at the end) that ``Task.import_offline_session``
uploads later. ``online=True``/``False`` forces the choice.

The Task is opened with ClearML's automatic hooks off (framework patching such as ``torch.save``,
argparse capture, resource monitoring, console capture) and reports from a thread instead of a
forked process: the tracker records only what the Trainer hands it, and leaves nothing running
after ``finish``. Keyword arguments to the tracker are passed to ``Task.init`` and can turn any of
these back on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import Tracker, scalars
from .images import to_hwc_uint8

CONFIG_SECTION = "config"
_UNSET = object()


class ClearMLTracker(Tracker):
    """Records into a ClearML Task; a resumed fit continues the same Task when a server is reachable.

    A fit that raised leaves its Task marked failed. When the script already opened a Task
    (``Task.init`` before the Trainer), the tracker records into it and leaves it open.

    Args:
        online: ``True`` talks to the ClearML server, ``False`` stays offline; ``None`` (default)
            goes online only when credentials are configured.
        report_subprocess: ClearML's default on Linux forks a reporting process; ``False`` (the
            default here) reports from a thread of the training process instead.
        **task_kwargs: passed to ``Task.init`` (``task_type``, ``tags``, ``output_uri``...).

    The remaining keyword arguments are the Tracker's (``logging_dir``, ``run_name``...).
    """

    name = "clearml"
    requires = "clearml"
    extra = "clearml"

    def __init__(self, *, online: bool | None = None, report_subprocess: bool = False,
                 logging_dir: str | os.PathLike | None = None, run_name: str | None = None,
                 main_process_only: bool = True, on_error: str = "warn", send_every: float = 2.0, **task_kwargs: Any) -> None:
        super().__init__(logging_dir=logging_dir, run_name=run_name, main_process_only=main_process_only,
                         on_error=on_error, send_every=send_every)
        self.online = online
        self.report_subprocess = report_subprocess
        self.task_kwargs = task_kwargs
        self.owns_task = True
        self.offline_folder: Path | None = None
        self._subprocess_setting: Any = None

    def _start(self, project_name: str, config: dict[str, Any], logging_dir: Path, **init_kwargs: Any) -> Any:
        from clearml import Task

        current: Any = Task.current_task()
        self.owns_task = current is None
        # the script opened its own Task (ClearML keeps one per process): record into it and leave it open
        task = current if current is not None else self._init_task(project_name, init_kwargs)
        self.run_id = task.id
        self.offline_folder = Path(task.get_offline_mode_folder()) if Task.is_offline() else None
        self.run = task
        self.logger = task.get_logger()
        self._store_config(config)
        return task

    def _init_task(self, project_name: str, init_kwargs: dict[str, Any]) -> Any:
        from clearml import Task

        online = credentials_configured() if self.online is None else self.online
        if not online:
            Task.set_offline(True)
        elif self.online and Task.is_offline():
            Task.set_offline(False)
        options = {"auto_connect_frameworks": False, "auto_connect_arg_parser": False,
                   "auto_resource_monitoring": False, "auto_connect_streams": False, "reuse_last_task_id": False,
                   **self.task_kwargs, **init_kwargs}
        if self.run_id is not None and not Task.is_offline() and not self.run_id.startswith("offline-"):
            options.setdefault("continue_last_task", self.run_id)  # offline sessions cannot be continued
        if not self.report_subprocess:
            # ClearML's sdk.development.report_use_subprocess, for this Task only: restored when it closes
            self._subprocess_setting = vars(Task).get("_report_subprocess_enabled", _UNSET)
            setattr(Task, "_report_subprocess_enabled", False)  # noqa: B010 - a class setting ClearML's types do not list
        try:
            return Task.init(project_name=project_name, task_name=self.run_name or project_name, **options)
        except BaseException:
            self._restore_subprocess_setting()
            raise

    def _store_config(self, config: dict[str, Any]) -> None:
        self.run.connect(dict(config), name=CONFIG_SECTION)

    def _log(self, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        for name, value in scalars(values).items():
            if step is None:  # no iteration: ClearML's single-value summary table
                self.logger.report_single_value(name, value)
            else:
                title, series = title_and_series(name)
                self.logger.report_scalar(title, series, value, iteration=step)

    def _log_images(self, images: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        for name, image in images.items():
            title, series = title_and_series(name)
            array = to_hwc_uint8(image)
            if array.shape[-1] == 4:  # ClearML stores JPEG, which has no alpha channel: it would drop the image
                array = array[..., :3]
            self.logger.report_image(title, series, iteration=step or 0, image=array)

    def _log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None, **kwargs: Any) -> None:
        title, series = title_and_series(name)
        # a list of rows, the first being the header: no pandas needed
        self.logger.report_table(title, series, iteration=step or 0, table_plot=[list(columns), *rows])

    def _log_artifact(self, path: Path, name: str | None, **kwargs: Any) -> None:
        self.run.upload_artifact(name or path.name, artifact_object=path, wait_on_upload=True, **kwargs)

    def _finish(self, status: str) -> None:
        if not self.owns_task:
            self.run.flush(wait_for_uploads=True)
            return
        try:
            self.run.close()
            if status == "failed":  # after close, which would mark it completed
                self.run.mark_failed(status_reason="training raised an exception", force=True)
            elif status == "interrupted":
                self.run.mark_stopped(force=True, status_message="stopped on a signal")
        finally:
            self._restore_subprocess_setting()

    def _restore_subprocess_setting(self) -> None:
        from clearml import Task

        previous, self._subprocess_setting = self._subprocess_setting, None
        if previous is None:
            return
        if previous is _UNSET:
            del Task._report_subprocess_enabled
        else:
            Task._report_subprocess_enabled = previous


def credentials_configured() -> bool:
    """Whether ClearML has a server to talk to: credentials in the environment or a ``clearml.conf``."""
    if os.environ.get("CLEARML_API_ACCESS_KEY") or os.environ.get("TRAINS_API_ACCESS_KEY"):
        return True
    override = os.environ.get("CLEARML_CONFIG_FILE") or os.environ.get("TRAINS_CONFIG_FILE")  # replaces the defaults
    candidates = [override] if override else ["~/clearml.conf", "~/trains.conf"]
    return any(Path(os.path.expandvars(os.path.expanduser(path))).is_file() for path in candidates)


def title_and_series(name: str) -> tuple[str, str]:
    """``"val/loss"`` -> plot ``"val"``, series ``"loss"``; a name without ``/`` is its own plot and series."""
    title, _, series = name.rpartition("/")
    return (title, series) if title and series else (name, name)

