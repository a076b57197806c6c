"""A new local MLflow store as a copy of an empty one: creating the tables takes a second or two,
copying the file milliseconds.

The empty store is made once per mlflow version, by mlflow itself, and kept in the user's cache
(``$XDG_CACHE_HOME/trainer/mlflow``, else ``~/.cache/trainer/mlflow``). A copy gets the default
experiment's artifact location set beside it, as a store created in place would. Where the
cache cannot be written, mlflow creates the store in place as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainer" / "mlflow"


def empty_store() -> Path | None:
    """The empty store of the installed mlflow version, made now if there is none; None if it cannot be."""
    import mlflow
    from mlflow import MlflowClient

    template = cache_dir() / f"empty-{mlflow.__version__}.db"
    if template.is_file():
        return template
    scratch = template.with_name(f".{template.name}.{os.getpid()}-{threading.get_ident()}")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=f"sqlite:///{scratch}")
        client.search_experiments()  # mlflow creates its tables and the default experiment
        engine = getattr(getattr(getattr(client, "_tracking_client", None), "store", None), "engine", None)
        if engine is not None:
            engine.dispose()
        os.replace(scratch, template)  # whole or not at all, whoever else makes it at the same time
    except (OSError, sqlite3.Error):
        with contextlib.suppress(OSError):
            scratch.unlink()
        return None
    return template


def seed_store(path: Path) -> None:
    """Create the sqlite store ``path`` from the empty one, unless it exists (or no empty store can be had)."""
    if path.exists():
        return
    template = empty_store()
    if template is None:
        return
    scratch = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}")
    try:
        shutil.copyfile(template, scratch)
        with contextlib.closing(sqlite3.connect(scratch)) as db, db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       (str(path.parent / "mlruns" / "0"),))
        os.link(scratch, path)  # fails if another process created the store meanwhile: theirs is kept
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            scratch.unlink()
