"""``FitConfigCallback``: the resolved ``trainer fit`` config, stored in every checkpoint as ``fit_config.json``.

Checkpoints hold only JSON and safetensors files (a load refuses anything else), so the config is
stored as JSON; ``trainer fit --config <checkpoint>/fit_config.json`` builds the same run again.
The file is written into the checkpoint's scratch folder before the manifest, so the manifest
covers it and a load checks it like every other file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.callbacks import Callback

if TYPE_CHECKING:
    from trainer.callbacks.protocols import TrainerView

FILE_NAME = "fit_config.json"


class FitConfigCallback(Callback):
    """Write ``config_json`` (the resolved config, as JSON text) into every checkpoint the run saves."""

    def __init__(self, config_json: str) -> None:
        json.loads(config_json)  # refuse text that --config could not read back, before any training
        self.config_json = config_json if config_json.endswith("\n") else config_json + "\n"

    def handles(self, event: str) -> bool:
        """Only ``on_save_checkpoint``: every other event costs nothing."""
        return event == "on_save_checkpoint"

    def on_save_checkpoint(self, trainer: TrainerView, checkpoint_dir: Path) -> None:
        """Called on every process while a checkpoint is written into ``checkpoint_dir`` (its scratch folder).

        The main process writes ``fit_config.json`` there; the manifest written after it lists the file.
        """
        if trainer.is_main_process:
            (Path(checkpoint_dir) / FILE_NAME).write_text(self.config_json)
