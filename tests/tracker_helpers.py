"""What a run logged, read back from the CSV tracker's file: the reference other trackers are compared with."""

from __future__ import annotations

import csv
from pathlib import Path


def csv_history(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from ``<output_dir>/csv/metrics.csv``, in file order."""
    history: dict[str, list[tuple[int, float]]] = {}
    with (Path(output_dir) / "csv" / "metrics.csv").open(newline="") as file:
        for row in csv.DictReader(file):
            for name, value in row.items():
                if name != "step" and value != "":
                    history.setdefault(name, []).append((int(row["step"]), float(value)))
    return history
