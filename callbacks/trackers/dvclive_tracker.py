"""DVCLive: metrics, parameters, images and artifacts as plain files in ``<logging_dir>/dvclive``.

DVCLive writes ``params.yaml``, ``metrics.json`` (the latest values) and one ``plots/metrics/<name>.tsv``
per metric (every step), which ``dvc plots``/``dvc exp show`` and DVC Studio read.

DVCLive's own default, inside a Git repository without DVC, is to run ``dvc init`` there and stage
the new files (and it fails in a Git repository without commits). This tracker uses a DVC
repository only when the working directory already is in one, so it runs the same inside or
outside Git and touches nothing outside its folder; ``init_dvc=True`` restores DVCLive's default.
Without a DVC repository, ``log_artifact`` copies into ``dvclive/artifacts`` (DVCLive itself would skip it).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from .base import Tracker, scalars
from .images import to_hwc_uint8


class DVCLiveTracker(Tracker):
    """Records with ``dvclive.Live``; a resumed fit appends to the same folder (``resume=True``).

    Args:
        init_dvc: let DVCLive ``dvc init`` an enclosing Git repository that has no DVC yet (its default).
        **live_kwargs: passed to ``dvclive.Live`` (``report="html"``, ``save_dvc_exp=True``, ``dvcyaml="dvc.yaml"``...).

    The remaining keyword arguments are the Tracker's (``logging_dir``, ``run_name``...).
    """

    name = "dvclive"
    requires = "dvclive"
    extra = "dvclive"

    def __init__(self, *, init_dvc: bool = False, logging_dir: str | os.PathLike | None = None,
                 run_name: str | None = None, main_process_only: bool = True, on_error: str = "warn",
                 **live_kwargs: Any) -> None:
        super().__init__(logging_dir=logging_dir, run_name=run_name, main_process_only=main_process_only,
                         on_error=on_error)
        self.init_dvc = init_dvc
        self.live_kwargs = live_kwargs

    def _start(self, project_name: str, config: dict[str, Any], logging_dir: Path, **init_kwargs: Any) -> Any:
        directory = logging_dir / "dvclive"
        # save_dvc_exp: committing an experiment needs Git and DVC; dvcyaml: no dvc.yaml to keep in step
        options = {"save_dvc_exp": False, "dvcyaml": None, "exp_name": self.run_name, **self.live_kwargs, **init_kwargs}
        self.run = _live_class()(dir=str(directory), resume=self.run_id is not None,
                                 use_dvc=self.init_dvc or _in_dvc_repo(), **options)
        self.run_id = str(directory.resolve())
        self._store_config(config)
        return self.run

    def _store_config(self, config: dict[str, Any]) -> None:
        self.run.log_params({key: _param(value) for key, value in config.items()})

    def _log(self, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        if step is not None:
            self.run.step = step  # set, not next_step(): the Trainer's step is the x axis, and no extra row appears
        options = {key: kwargs[key] for key in ("timestamp", "plot") if key in kwargs}
        for name, value in scalars(values).items():
            self.run.log_metric(name, value, **options)
        self.run.sync()  # metrics.json (and a report or Studio, when configured) up to date after every call

    def _log_images(self, images: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        for name, image in images.items():
            # one file per step in a folder named after the image: DVC's plots and Studio show it as a slider
            file = f"{name}.png" if step is None else f"{name}/{step}.png"
            array = to_hwc_uint8(image)
            self.run.log_image(file, array[..., 0] if array.shape[-1] == 1 else array)  # PIL wants greyscale as HxW

    def _log_artifact(self, path: Path, name: str | None, **kwargs: Any) -> None:
        if getattr(self.run, "_dvc_repo", None) is not None:  # DVCLive caches it with `dvc add`
            self.run.log_artifact(path, name=name, **kwargs)
            return
        target = Path(self.run.artifacts_dir) / (name or path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target)

    def _finish(self, status: str) -> None:
        self.run.end()


@functools.cache
def _live_class() -> type:
    """``dvclive.Live`` with two start-up behaviours made optional (built on first use: dvclive is imported lazily)."""
    from dvclive import Live

    class QuietLive(Live):
        def __init__(self, *args: Any, use_dvc: bool = True, **kwargs: Any) -> None:
            self._use_dvc = use_dvc
            super().__init__(*args, **kwargs)

        def _init_dvc(self) -> None:
            if self._use_dvc:
                try:
                    super()._init_dvc()
                    return
                except Exception as error:  # e.g. a Git repository without commits: go on without DVC, as DVCLive does
                    warnings.warn(f"DVCLive runs without DVC: {type(error).__name__}: {error}", RuntimeWarning,
                                  stacklevel=2)
                    self._dvc_repo = None
            # what DVCLive does when it finds no repository: no Git, no DVC, no experiment to save
            self._dvc_file = self._init_dvc_file()
            self._save_dvc_exp = False

        def post_data_to_studio(self) -> None:
            # DVCLive starts a never-ending sender thread here even when Studio is not configured
            if "data" not in getattr(self, "_studio_events_to_skip", ()):
                super().post_data_to_studio()

    return QuietLive


def _in_dvc_repo(start: str | os.PathLike | None = None) -> bool:
    """Whether the working directory (where DVC looks) is inside a DVC repository."""
    folder = Path(start or os.getcwd()).resolve()
    return any((parent / ".dvc").is_dir() for parent in (folder, *folder.parents))


def _param(value: Any) -> Any:
    """A value DVCLive can write to params.yaml: YAML scalars, lists and dicts; anything else as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(key): _param(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_param(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return str(value)

