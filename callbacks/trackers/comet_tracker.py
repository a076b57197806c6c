"""Comet: an online experiment when an API key is set, else an offline archive under ``<logging_dir>/comet``.

Offline without ``COMET_API_KEY`` so that a machine without credentials or network trains all the
same; ``comet upload <archive>.zip`` sends the run later. Offline, comet_ml is imported with its
error reporting off: it would otherwise send its own error logs to Sentry over the network, the
one thing an offline run must not do. Comet's automatic parameter and metric logging is off by
default, because the Trainer sends both itself and Comet would record them a second time under
other names; any ``comet_ml.ExperimentConfig`` field passed to the tracker changes that.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .base import Tracker, env_default, scalars

TRUE = ("1", "true", "yes", "on")
START_ARGUMENTS = ("api_key", "workspace", "experiment_key", "mode", "online", "source")  # comet_ml.start's own


class CometMLTracker(Tracker):
    """Args (besides Tracker's): ``online`` (default: ``COMET_START_ONLINE``, else online when
    ``COMET_API_KEY`` is set), ``workspace``, and any ``comet_ml.ExperimentConfig`` field
    (``tags``, ``log_code``, ``auto_output_logging``, ``offline_directory``...).
    """

    name = "comet_ml"
    requires = "comet_ml"
    extra = "comet"

    def __init__(self, *, online: bool | None = None, workspace: str | None = None,
                 logging_dir: str | os.PathLike | None = None, run_name: str | None = None,
                 main_process_only: bool = True, on_error: str = "warn", **experiment_config: Any) -> None:
        super().__init__(logging_dir=logging_dir, run_name=run_name, main_process_only=main_process_only, on_error=on_error)
        self.online = online
        self.workspace = workspace
        self.experiment_config = experiment_config

    def resolve_online(self) -> bool:
        """The explicit choice, else ``COMET_START_ONLINE``, else online only when ``COMET_API_KEY`` is set."""
        if self.online is not None:
            return self.online
        if os.environ.get("COMET_START_ONLINE"):
            return os.environ["COMET_START_ONLINE"].strip().lower() in TRUE
        return bool(os.environ.get("COMET_API_KEY"))

    def _start(self, project_name: str, config: dict[str, Any], logging_dir: Path, **init_kwargs: Any) -> Any:
        """``init_kwargs`` may hold ``comet_ml.start`` arguments, ``ExperimentConfig`` fields, or an ``experiment_config``."""
        options = {**self.experiment_config, **init_kwargs}
        start = {key: options.pop(key) for key in START_ARGUMENTS if key in options}
        online = start.pop("online", None)
        online = self.resolve_online() if online is None else bool(online)
        with contextlib.nullcontext() if online else env_default("COMET_ERROR_TRACKING_ENABLE", "false"):
            import comet_ml  # reads the setting once, at its first import

        experiment_config = options.pop("experiment_config", None)
        if experiment_config is None:
            fields = {"auto_param_logging": False, "auto_metric_logging": False, "parse_args": False, "name": self.run_name}
            if not online:
                fields["offline_directory"] = str(logging_dir / "comet")
            experiment_config = comet_ml.ExperimentConfig(**{**fields, **options})
        if not online:
            Path(experiment_config.offline_directory).mkdir(parents=True, exist_ok=True)  # comet creates one level only
        start.setdefault("workspace", self.workspace)
        start.setdefault("experiment_key", self.run_id)  # restored from a checkpoint: continue that experiment
        start.setdefault("mode", "get_or_create")
        experiment = comet_ml.start(project_name=project_name, online=online, experiment_config=experiment_config, **start)
        self.run_id = experiment.get_key()
        self.run = experiment
        self._store_config(config)
        return experiment

    def _store_config(self, config: dict[str, Any]) -> None:
        # nested dicts become "outer|inner" parameters, which Comet's UI shows as a tree
        self.run.log_parameters(config)

    def _log(self, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        numbers = scalars(values)
        if numbers:
            self.run.log_metrics(numbers, step=step, **kwargs)
        for key, value in values.items():
            if isinstance(value, str):
                self.run.log_other(key, value)

    def _log_images(self, images: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        from PIL import Image

        from .images import to_hwc_uint8

        for key, image in images.items():
            array = to_hwc_uint8(image)
            # as a PIL image Comet stores the pixels as they are (arrays it would rescale to their min and max)
            picture = Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array)
            self.run.log_image(picture, name=key, step=step, **kwargs)

    def _log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None, **kwargs: Any) -> None:
        if step is not None:
            self.run.set_step(step)  # log_table has no step argument: the table takes the experiment's step
        filename = name if name.endswith((".csv", ".tsv")) else f"{name}.csv"
        self.run.log_table(filename, tabular_data=rows, headers=columns, **kwargs)

    def _log_artifact(self, path: Path, name: str | None, **kwargs: Any) -> None:
        if path.is_dir():
            self.run.log_asset_folder(str(path), log_file_name=True, recursive=True, **kwargs)
        else:
            self.run.log_asset(str(path), file_name=name or path.name, **kwargs)

    def _finish(self, status: str) -> None:
        if status != "success":
            self.run.log_other("status", status)
        self.run.end()
