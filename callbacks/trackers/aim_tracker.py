"""Aim: metrics, images, artifacts and the run configuration in a local Aim repository.

The repository is ``repo=`` when given, else the logging directory (Aim keeps its data in
``<repo>/.aim``; ``aim up --repo <repo>`` shows it). Aim's own background work (system metrics,
terminal-log capture) is off unless asked for, so a run starts no thread that outlives ``finish``.
Aim's UI indexes finished runs by itself; for ``aim.Repo(...)`` queries outside the UI, run
``aim storage --repo <repo> reindex`` once after training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import Tracker, scalars
from .images import to_hwc_uint8


class AimTracker(Tracker):
    """Records into an Aim run; a resumed fit continues the same run (same hash) in the same repository.

    Metrics are Aim metrics named as logged; the configuration is ``run["hparams"]``; a fit that
    raised is tagged ``failed``.

    Args:
        repo: the Aim repository folder (default: the logging directory).
        artifacts_uri: where ``log_artifact`` copies files (default: ``<repo>/aim-artifacts``);
            any URI Aim accepts, e.g. ``s3://bucket/prefix``.
        **run_kwargs: passed to ``aim.Run`` (``system_tracking_interval=10``, ``capture_terminal_logs=True``...).

    The remaining keyword arguments are the Tracker's (``logging_dir``, ``run_name``...).
    """

    name = "aim"
    requires = "aim"
    extra = "aim"

    def __init__(self, *, repo: str | os.PathLike | None = None, artifacts_uri: str | None = None,
                 logging_dir: str | os.PathLike | None = None, run_name: str | None = None,
                 main_process_only: bool = True, on_error: str = "warn", send_every: float = 2.0, **run_kwargs: Any) -> None:
        super().__init__(logging_dir=logging_dir, run_name=run_name, main_process_only=main_process_only,
                         on_error=on_error, send_every=send_every)
        self.repo = Path(repo) if repo is not None else None
        self.artifacts_uri = artifacts_uri
        self.run_kwargs = run_kwargs

    def _start(self, project_name: str, config: dict[str, Any], logging_dir: Path, **init_kwargs: Any) -> Any:
        import aim
        from aim.sdk.errors import MissingRunError

        self.repo_dir = Path(self.repo or logging_dir)
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        # Off by default: both run a thread for the whole run, and the capture replaces sys.stdout.
        options = {"system_tracking_interval": None, "capture_terminal_logs": False, **self.run_kwargs, **init_kwargs}
        run = None
        if self.run_id is not None:
            try:
                run = aim.Run(self.run_id, repo=str(self.repo_dir), experiment=project_name, **options)
            except MissingRunError:  # resumed against another repository: start a new run there
                run = None
        if run is None:
            run = aim.Run(repo=str(self.repo_dir), experiment=project_name, **options)
        if self.run_name:
            run.name = self.run_name
        self.run_id = run.hash
        self.run = run
        self._store_config(config)
        return run

    def _store_config(self, config: dict[str, Any]) -> None:
        for key, value in config.items():
            self.run["hparams", key] = _storable(value)

    def _log(self, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        for name, value in scalars(values).items():
            # float always: an Aim sequence keeps one type, and a metric may arrive as 1 and later as 0.5
            self.run.track(float(value), name=name, step=step, epoch=kwargs.get("epoch"), context=kwargs.get("context"))

    def _log_images(self, images: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        import aim

        for name, image in images.items():
            self.run.track(aim.Image(to_hwc_uint8(image), caption=kwargs.get("caption", "")), name=name, step=step,
                           context=kwargs.get("context"))

    def _log_artifact(self, path: Path, name: str | None, **kwargs: Any) -> None:
        if self.run.artifacts_uri is None:
            self.run.set_artifacts_uri(self.artifacts_uri or (self.repo_dir / "aim-artifacts").resolve().as_uri())
        if path.is_dir():
            self.run.log_artifacts(str(path), name=name, block=True)
        else:
            self.run.log_artifact(str(path), name=name, block=True)

    def _finish(self, status: str) -> None:
        if status != "success":
            self.run.add_tag(status)
        self.run.close()


def _storable(value: Any) -> Any:
    """The value as Aim can store it: plain numbers, strings, lists and dicts; anything else as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _storable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return str(value)

