"""CSV: metrics in ``<logging_dir>/csv/metrics.csv`` (one row per step), configuration in ``config.json``.

Needs no package and no server, so it is always part of the default. The file stays open and
rows are appended as they arrive (written through at every validation, epoch end and finish);
when a new metric name appears the file is rewritten once with the wider header.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from .base import Tracker, scalars


class CSVTracker(Tracker):
    name = "csv"

    def _start(self, project_name: str, config: dict[str, Any], logging_dir: Path, **init_kwargs: Any) -> Path:
        self.directory = logging_dir / "csv"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.csv"
        self.columns = self._existing_columns()
        self._file: Any = None
        self.run_id = self.run_id or project_name
        self._store_config({"project_name": project_name, **config})
        self._open_file()  # here, not at the first row: opening costs more than many rows
        return self.path

    def _store_config(self, config: dict[str, Any]) -> None:
        path = self.directory / "config.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored.update(config)
        path.write_text(json.dumps(stored, indent=2, sort_keys=True, default=str))

    def _log(self, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        row = {"step": "" if step is None else step, **scalars(values)}
        new = [name for name in row if name not in self.columns]
        if new or self._file is None:
            self._close_file()
            if new:
                self._widen(self.columns + new)
            self._open_file()
        self._writer.writerow(row)

    def _open_file(self) -> None:
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def _finish(self, status: str) -> None:
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None, **kwargs: Any) -> None:
        suffix = "" if step is None else f"_step{step}"
        with (self.directory / f"{name}{suffix}.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            writer.writerows(rows)

    def _log_artifact(self, path: Path, name: str | None, **kwargs: Any) -> None:
        target = self.directory / "artifacts" / (name or path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target)

    def _existing_columns(self) -> list[str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return ["step"]
        with self.path.open(newline="") as file:
            return next(csv.reader(file), ["step"])

    def _widen(self, columns: list[str]) -> None:
        rows = []
        if self.path.exists():
            with self.path.open(newline="") as file:
                rows = list(csv.DictReader(file))
        scratch = self.path.with_suffix(".csv.tmp")
        with scratch.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        scratch.replace(self.path)
        self.columns = columns
