"""The Accelerator's experiment-tracker calls (``init_trackers``, ``log``, ``get_tracker``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.callbacks.trackers import Tracker


class TrackingView:
    """Sends to the trackers given by ``log_with`` (the Accelerator sets ``trackers``)."""

    trackers: list[Tracker]

    @property
    def logging_dir(self) -> Path | None:
        raise NotImplementedError

    def init_trackers(self, project_name: str, config: dict[str, Any] | None = None,
                      init_kwargs: dict[str, Any] | None = None) -> None:
        """Start the trackers given by ``log_with`` (on the main process) and store ``config`` with the run.

        ``init_kwargs`` maps a tracker name to extra arguments for its backend's run start,
        e.g. ``{"wandb": {"tags": ["baseline"]}}``.
        """
        for tracker in self.trackers:
            tracker.start(project_name, config, self.logging_dir, **(init_kwargs or {}).get(tracker.name, {}))

    def log(self, values: dict[str, Any], step: int | None = None, log_kwargs: dict[str, Any] | None = None) -> None:
        """Send a dict of values to every tracker at ``step`` (main process only, unless a tracker says otherwise)."""
        for tracker in self.trackers:
            tracker.log(values, step=step, **(log_kwargs or {}).get(tracker.name, {}))

    def get_tracker(self, name: str, unwrap: bool = False) -> Any:
        """The tracker called ``name``; with ``unwrap=True`` the backend's own run object (also ``.tracker``)."""
        for tracker in self.trackers:
            if tracker.name == name:
                return tracker.tracker if unwrap else tracker
        known = ", ".join(t.name for t in self.trackers) or "none"
        raise ValueError(f"No tracker named {name!r} was given to log_with (trackers: {known}).")
