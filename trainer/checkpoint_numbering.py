"""Numbered checkpoints: where ``save_state()`` without a folder writes, which one ``load_state()`` reads, pruning."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.utils.configurations import ProjectConfiguration


def save_target(project: ProjectConfiguration, output_dir: str | os.PathLike | None, iteration: int) -> Path:
    """Where ``save_state`` writes: ``output_dir``, or (no folder, or automatic naming) the next numbered checkpoint."""
    if output_dir is not None and not project.automatic_checkpoint_naming:
        return Path(output_dir)
    if output_dir is not None:
        warnings.warn(f"save_state({os.fspath(output_dir)!r}) writes to project_dir/checkpoints/checkpoint_{iteration}: "
                      "ProjectConfiguration(automatic_checkpoint_naming=True) names the checkpoints.", UserWarning,
                      stacklevel=3)
    project_dir = Path(project.project_dir) if project.project_dir is not None else None
    target = numbered_checkpoint(project_dir, iteration, "save_state")
    if project.automatic_checkpoint_naming and target.exists():
        raise ValueError(f"The checkpoint {target} exists already: this run would write over it. Start numbering after "
                         "it (ProjectConfiguration(iteration=...) or accelerator.save_iteration), or use another "
                         "project_dir.")
    return target


def numbered_checkpoint(project_dir: Path | None, iteration: int | None, caller: str) -> Path:
    """``project_dir/checkpoints/checkpoint_<iteration>`` to save; with no iteration, the latest one there to load."""
    if project_dir is None:
        raise ValueError(f"{caller}() needs a directory: pass one, or create the Accelerator with project_dir= to "
                         "use numbered checkpoints.")
    root = project_dir / "checkpoints"
    if iteration is not None:
        return root / f"checkpoint_{iteration}"
    latest = latest_checkpoint(root)
    if latest is None:
        raise FileNotFoundError(f"{caller}(): no checkpoint_<n> directory under {root}.")
    return latest


def latest_checkpoint(root: Path) -> Path | None:
    """The ``checkpoint_<n>`` directory with the largest n under ``root``."""
    numbered = _numbered(root)
    return numbered[-1] if numbered else None


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` highest-numbered ``checkpoint_<n>`` directories under ``root``; return the deleted."""
    doomed = _numbered(root)[:-keep] if keep > 0 else _numbered(root)
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def _numbered(root: Path) -> list[Path]:
    """The ``checkpoint_<n>`` directories under ``root``, lowest n first."""
    if not root.is_dir():
        return []
    numbered = [(int(m.group(1)), p) for p in root.iterdir()
                if p.is_dir() and (m := re.fullmatch(r"checkpoint_(\d+)", p.name))]
    return [path for _, path in sorted(numbered)]
