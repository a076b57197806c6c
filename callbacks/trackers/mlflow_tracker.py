"""MLflow: a local sqlite store under the logging directory by default, any tracking server by URI.

Uses ``MlflowClient`` rather than mlflow's module-level "active run", so several trackers (and
the user's own mlflow code) never share hidden global state. A server URI is checked once at
the start with a short health request: an unreachable server is one warning, not minutes of
retries inside the training loop.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from .base import Tracker, scalars
from .mlflow_store import seed_store

MAX_PARAM_LENGTH = 6000  # mlflow's limit on a parameter value
BATCH = 100  # mlflow's limit on parameters per log_batch call
METRIC_BATCH = 1000  # mlflow's limit on metrics per log_batch call


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested configuration as ``{"a.b": "value"}`` strings, as MLflow parameters are."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


class MLflowTracker(Tracker):
    """Args (besides Tracker's): ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<logging_dir>/mlflow.db``), ``experiment_name`` (default: the project name,
    or ``MLFLOW_EXPERIMENT_NAME``), ``tags``, ``health_timeout`` seconds for the server check,
    ``flush_every`` seconds (metrics are sent in batches: at most this long after they were logged,
    at every validation and epoch end, and when the run finishes), and ``synchronous``: False (the
    default) runs every call to mlflow (creating the store, starting the run, sending, finishing)
    on the tracker's own thread, so that training never waits for a slow store or server; the run
    is finished and everything written when ``finish`` returns. (mlflow's own asynchronous queue is
    not used: finishing a run waits up to a second for it.) A new local store is a copy of an
    empty one kept in the user's cache (``mlflow_store.py``): creating its tables takes seconds.
    """

    name = "mlflow"
    requires = "mlflow"
    extra = "mlflow"

    def __init__(self, *, tracking_uri: str | None = None, experiment_name: str | None = None,
                 tags: dict[str, str] | None = None, health_timeout: float = 5.0, flush_every: float = 10.0,
                 synchronous: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.tags = dict(tags or {})
        self.health_timeout = health_timeout
        self.background = not synchronous  # synchronous: every call to mlflow in the training thread
        self.flush_every = flush_every
        self._pending: list[Any] = []  # metrics not yet sent
        self._last_flush = 0.0
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` of the run (once it has started)."""
        self._wait_for_start()
        return self._client

    def resolve_uri(self, logging_dir: Path) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        logging_dir.mkdir(parents=True, exist_ok=True)
        store = (logging_dir / "mlflow.db").resolve()
        seed_store(store)
        return f"sqlite:///{store}"

    def _start(self, project_name: str, config: dict[str, Any], logging_dir: Path, **init_kwargs: Any) -> Any:
        from mlflow import MlflowClient

        uri = self.resolve_uri(logging_dir)
        if uri.startswith(("http://", "https://")):
            self._check_server(uri)
        self._client = MlflowClient(tracking_uri=uri)
        self._last_flush = time.monotonic()  # the first batch goes out flush_every seconds from now, not at once
        if self.run_id is not None:  # resumed: continue the same run
            self._client.update_run(self.run_id, status="RUNNING")
            run = self._client.get_run(self.run_id)
        else:
            experiment_id = self._experiment(project_name, uri, logging_dir)
            tags = {**self.tags, **init_kwargs.pop("tags", {})}
            run = self._client.create_run(experiment_id, run_name=self.run_name, tags=tags, **init_kwargs)
            self.run_id = run.info.run_id
            self._store_config(config)
        return run

    def _experiment(self, project_name: str, uri: str, logging_dir: Path) -> str:
        name = self.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or project_name
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        local = uri.startswith("sqlite:")
        location = (logging_dir / "mlartifacts").resolve().as_uri() if local else None
        return self._client.create_experiment(name, artifact_location=location)

    def _check_server(self, uri: str) -> None:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=self.health_timeout) as response:
                response.read()
        except OSError as error:
            raise ConnectionError(f"no MLflow server answers at {uri} ({error})") from error

    def _store_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flatten(config).items()]
        for i in range(0, len(params), BATCH):
            self._client.log_batch(self.run_id, params=params[i:i + BATCH])

    def _log(self, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, step or 0) for key, value in scalars(values).items())
        if len(self._pending) >= METRIC_BATCH or time.monotonic() - self._last_flush >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        for i in range(0, len(pending), METRIC_BATCH):
            self._client.log_batch(self.run_id, metrics=pending[i:i + METRIC_BATCH])

    def _log_images(self, images: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        from .images import to_hwc_uint8

        for key, image in images.items():
            self._client.log_image(self.run_id, to_hwc_uint8(image), key=key, step=step or 0)

    def _log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None, **kwargs: Any) -> None:
        table = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
        suffix = "" if step is None else f"_step{step}"
        self._client.log_table(self.run_id, data=table, artifact_file=f"tables/{name}{suffix}.json")

    def _log_artifact(self, path: Path, name: str | None, **kwargs: Any) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=name)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path=name)

    def _finish(self, status: str) -> None:
        try:
            self._flush()
        finally:  # the run is closed even when its last metrics could not be sent
            self._client.set_terminated(self.run_id,
                                       status={"success": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
