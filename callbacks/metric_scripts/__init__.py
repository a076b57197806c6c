"""Small ``evaluate`` metric scripts shipped with the project, loadable offline with ``evaluate.load(path)``.

``evaluate.load("accuracy")`` fetches its script from a hub; these give the same results from
local files. ``script_path("accuracy")`` is the path to pass to ``evaluate.load``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
NAMES = tuple(sorted(p.name for p in HERE.iterdir() if p.is_dir() and (p / f"{p.name}.py").exists()))


def script_path(name: str) -> str | None:
    """The folder holding the bundled script for metric ``name``, or None when none is bundled."""
    folder = HERE / name
    return str(folder) if (folder / f"{name}.py").exists() else None
