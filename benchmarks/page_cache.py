"""Emptying the page cache of given files, for cold-read measurements (no root needed for one's own files)."""

from __future__ import annotations

import os
from pathlib import Path


def drop_cache(path: Path) -> None:
    """Write back, then drop, the pages of a file, or of every file under a folder, from the page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
