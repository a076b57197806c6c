"""Find the Trainer subclass ``trainer fit`` builds, from ``module:Class`` or ``path/to/file.py:Class``.

The current directory is importable, as under ``python -m``; a file's folder is put first on the
path and the file imported under its own name (as ``python path/to/file.py`` would make its
siblings importable), so the config's ``class_path`` entries may name what it defines
(``file.Net``). Every failure is one ``CliError`` that says what to change.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from trainer.cli.errors import CliError

DEFAULT_TRAINER = "trainer:Trainer"
_FORMS = "module:Class (e.g. my_project.train:MyTrainer) or path/to/file.py:Class"


def make_cwd_importable() -> None:
    """Put the working directory first on ``sys.path`` (the ``trainer`` console script does not; ``python -m`` does)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def split_spec(spec: str) -> tuple[str, str]:
    """``(module or file, class name)`` of ``module:Class``, ``file.py:Class`` or ``module.Class``."""
    where, colon, name = spec.rpartition(":")
    if not colon:
        where, _, name = spec.rpartition(".")
    if not where or not name.isidentifier():
        raise CliError(f"trainer class {spec!r}: write it as {_FORMS}.")
    return where, name


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise CliError(f"trainer class: no file {path} (the path is relative to {os.getcwd()}); check it.")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
            return loaded
        raise CliError(f"trainer class: {path} would be imported as module {name!r}, but a module of that name is "
                       f"already loaded from {getattr(loaded, '__file__', None)}; rename the file.")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"trainer class: {path} is not a Python file Python can import; give a .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and name.startswith(error.name) and name[len(error.name):][:1] in ("", "."):
            raise CliError(f"trainer class: no module named {error.name!r} (looked in {os.getcwd()} and on the Python "
                           "path); run from the folder that holds it, or give path/to/file.py:Class.") from None
        raise  # the module exists and one of its own imports failed: its traceback says which


def trainer_subclasses(module: ModuleType) -> list[str]:
    """The names of the Trainer classes ``module`` defines or imports."""
    from trainer import Trainer

    return sorted(name for name, value in vars(module).items()
                  if inspect.isclass(value) and issubclass(value, Trainer) and not name.startswith("_"))


def load_trainer_class(spec: str) -> type[Any]:
    """The Trainer subclass ``spec`` names; a ``CliError`` naming the closest class when it names none."""
    from trainer import Trainer

    where, name = split_spec(spec)
    module = _import_file(Path(where)) if where.endswith(".py") else _import_module(where)
    found = getattr(module, name, None)
    if found is None:
        choices = trainer_subclasses(module)
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" Did you mean {where}:{close[0]}?" if close else (
            f" It has {', '.join(choices)}." if choices else " It defines no Trainer subclass.")
        raise CliError(f"trainer class {spec!r}: {where} has no {name!r}.{hint}")
    if not (inspect.isclass(found) and issubclass(found, Trainer)):
        raise CliError(f"trainer class {spec!r} is {type(found).__name__} {found!r}, not a subclass of trainer.Trainer; "
                       "name the class that subclasses Trainer (and overrides training_step).")
    return found
