"""Weights & Biases: a run under ``<logging_dir>/wandb``, offline unless an API key says otherwise.

Offline is the default without ``WANDB_API_KEY`` so that a fresh machine, a CI job or a cluster
node without network never stops at wandb's login prompt nor waits on a server; the offline run
is uploaded later with ``wandb sync``. The run is created with ``reinit="create_new"`` so that it
neither finishes nor joins a wandb run the user opened themselves, and wandb's background service
is shut down once the last run of the process has finished, so nothing outlives ``fit``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from .base import Tracker, env_default

MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def artifact_name(name: str) -> str:
    """wandb artifact names allow only letters, digits, dashes, underscores and dots."""
    return re.sub(r"[^\w.-]", "-", name).strip("-") or "artifact"


class WandbTracker(Tracker):
    """Args (besides Tracker's): ``mode`` (``"online"``, ``"offline"``, ``"disabled"``; default:
    ``WANDB_MODE``, else online when ``WANDB_API_KEY`` is set, else offline), ``entity``, and any
    other ``wandb.init`` keyword (``tags``, ``group``, ``notes``, ``settings``...).
    """

    name = "wandb"
    requires = "wandb"
    extra = "wandb"

    def __init__(self, *, mode: str | None = None, entity: str | None = None,
                 logging_dir: str | os.PathLike | None = None, run_name: str | None = None,
                 main_process_only: bool = True, on_error: str = "warn", **init_kwargs: Any) -> None:
        super().__init__(logging_dir=logging_dir, run_name=run_name, main_process_only=main_process_only, on_error=on_error)
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}.")
        self.mode = mode
        self.entity = entity
        self.init_kwargs = init_kwargs

    def resolve_mode(self) -> str:
        """The explicit mode, else ``WANDB_MODE``, else online only when an API key is in the environment."""
        if self.mode is not None:
            return self.mode
        if os.environ.get("WANDB_MODE"):
            return os.environ["WANDB_MODE"]
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"

    def _start(self, project_name: str, config: dict[str, Any], logging_dir: Path, **init_kwargs: Any) -> Any:
        import wandb

        mode = self.resolve_mode()
        options: dict[str, Any] = {"project": project_name, "name": self.run_name, "entity": self.entity,
                                   "config": config, "dir": str(logging_dir), "mode": mode, "reinit": "create_new",
                                   **self.init_kwargs, **init_kwargs}
        if self.run_id is not None:  # restored from a checkpoint: continue that run
            options.setdefault("id", self.run_id)
            options.setdefault("resume", "allow")
        if mode == "online" and not os.environ.get("WANDB_API_KEY") and wandb.run is None \
                and not wandb.login(prompt=False, verify=False):
            # wandb.init would ask for a key on a terminal and wait: fail now, with the ways out
            raise RuntimeError("mode='online' needs a W&B API key: set WANDB_API_KEY or run `wandb login` "
                               "(or use mode='offline' and `wandb sync` later).")
        Path(options["dir"]).mkdir(parents=True, exist_ok=True)  # wandb expects it to exist
        offline = mode in ("offline", "dryrun", "disabled")
        # offline, wandb's error reporting is the only thing that would still try the network
        with env_default("WANDB_ERROR_REPORTING", "false") if offline else contextlib.nullcontext():
            run = wandb.init(**options)
        self.run_id = run.id
        return run

    def _store_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def _log(self, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        self.run.log(values, step=step, **kwargs)

    def _log_images(self, images: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        import wandb

        from .images import to_hwc_uint8

        self.run.log({key: wandb.Image(to_hwc_uint8(image), **kwargs) for key, image in images.items()}, step=step)

    def _log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None, **kwargs: Any) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=list[str | int](columns), data=rows, **kwargs)}, step=step)

    def _log_artifact(self, path: Path, name: str | None, **kwargs: Any) -> None:
        """A versioned wandb Artifact (``type=`` defaults to ``"file"``; ``aliases=``, ``metadata=`` pass through)."""
        import wandb

        aliases = kwargs.pop("aliases", None)
        artifact = wandb.Artifact(artifact_name(name or path.name), type=kwargs.pop("type", "file"), **kwargs)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=aliases)

    def _finish(self, status: str) -> None:
        import wandb

        self.run.finish(exit_code=0 if status == "success" else 1)
        if not self._other_runs_open():
            wandb.teardown()  # stops wandb's service process once no run of this process needs it

    @staticmethod
    def _other_runs_open() -> bool:
        """Whether this process still has a wandb run open (the user's own, or another tracker's)."""
        try:
            from wandb.sdk import wandb_setup

            return wandb_setup.singleton().most_recent_active_run is not None
        except (ImportError, AttributeError):  # a wandb without that bookkeeping: leave the service to wandb's exit hook
            return True
