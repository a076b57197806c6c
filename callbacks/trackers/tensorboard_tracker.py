"""TensorBoard: event files under ``<logging_dir>/tensorboard/<project>[/<run_name>]``.

Written with ``torch.utils.tensorboard.SummaryWriter`` (which needs the tensorboard package);
the run configuration is stored as a text summary, tables as markdown text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import Tracker, scalars


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    requires = "tensorboard"
    extra = "tensorboard"

    def _start(self, project_name: str, config: dict[str, Any], logging_dir: Path, **init_kwargs: Any) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        directory = Path(self.run_id) if self.run_id else logging_dir / "tensorboard" / project_name
        if self.run_name and not self.run_id:
            directory = directory / self.run_name
        self.run_id = str(directory)
        writer = SummaryWriter(log_dir=str(directory), **init_kwargs)
        self.run = writer
        self._store_config(config)
        return writer

    def _store_config(self, config: dict[str, Any]) -> None:
        if config:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self.run.add_text("run_config", "```\n" + text + "\n```")

    def _log(self, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        for key, value in scalars(values).items():
            self.run.add_scalar(key, value, global_step=step, **kwargs)
        for key, value in values.items():
            if isinstance(value, str):
                self.run.add_text(key, value, global_step=step)

    def _flush(self) -> None:
        self.run.flush()

    def _log_images(self, images: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        from .images import to_hwc_uint8

        for key, image in images.items():
            self.run.add_image(key, to_hwc_uint8(image), global_step=step, dataformats="HWC")
        self.run.flush()

    def _log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None, **kwargs: Any) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        self.run.add_text(name, "\n".join(lines), global_step=step)
        self.run.flush()

    def _finish(self, status: str) -> None:
        self.run.close()
