"""The Trainer's records: ``log``, ``log_dict`` and what trackers read back (``logged_since``, ``run_config``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from trainer.metrics import LogRecord

if TYPE_CHECKING:
    from trainer.accelerator import Accelerator
    from trainer.progress import TrainerProgress


class TrainerLogging:
    """Mixed into ``Trainer``: values logged by name at the current step, for ``trainer.metrics`` and the trackers."""

    accelerator: Accelerator
    progress: TrainerProgress
    metrics: dict[str, float]
    model: torch.nn.Module
    hparams: dict[str, Any]
    _logged: LogRecord
    _settings: dict[str, Any]
    call: Callable[..., None]

    def log(self, name: str, value: Any, sync: bool = False) -> None:
        """Record a value in ``trainer.metrics`` and for the trackers, at the current ``global_step``.

        ``sync=True`` averages it over processes first.
        """
        self.call("on_log", {name: self._record(name, value, sync)})

    def _record(self, name: str, value: Any, sync: bool) -> float:
        if sync:
            value = self.accelerator.reduce(torch.as_tensor(value, device=self.accelerator.device, dtype=torch.float64),
                                            "mean")
        number = self.metrics[name] = float(value.detach()) if torch.is_tensor(value) else float(value)
        self._logged.add(name, number, self.progress.global_step)
        return number

    @property
    def log_sequence(self) -> int:
        """How many values ``log`` has recorded so far (trackers compare it to what they sent)."""
        return self._logged.sequence

    def logged_since(self, sequence: int) -> tuple[int, dict[int, dict[str, float]]]:
        """The values logged after ``sequence`` (their latest value per step), grouped by step."""
        return self._logged.since(sequence)

    def run_config(self) -> dict[str, Any]:
        """What trackers store as the run's configuration: the settings, ``hparams``, the model's config."""
        config: dict[str, Any] = {**self._settings, **self.hparams}
        model_config: Any = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if hasattr(model_config, "to_dict"):
            config["model_config"] = model_config.to_dict()
        return config

    def log_dict(self, values: Mapping[str, Any], sync: bool = False) -> None:
        """Record several values at once (one ``on_log`` event for them all)."""
        self.call("on_log", {name: self._record(name, value, sync) for name, value in values.items()})
