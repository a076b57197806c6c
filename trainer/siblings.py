"""``trainer.callbacks`` and ``trainer.strategies``: the framework's packages under names nothing can shadow.

The built-in callbacks and strategies live in the top-level ``callbacks/`` and ``strategies/``
folders, and users import them as ``callbacks`` and ``strategies``. Those are common names: a
``callbacks.py`` or ``strategies.py`` beside a user's script comes first on ``sys.path`` and would
take the name. So the framework itself imports the two packages only as ``trainer.callbacks`` and
``trainer.strategies`` (``trainer/callbacks`` and ``trainer/strategies`` lead to the same folders),
and their modules import each other relatively, so they load under either name.

Both names must still give the same module objects, or a callback built from
``callbacks.ModelCheckpoint`` would not be an instance of ``trainer.callbacks.ModelCheckpoint``.
The finder below, installed when ``trainer`` is imported, serves an import of one name from the
module already loaded under the other, whichever came first: ``callbacks.bus`` after
``trainer.callbacks.bus`` was loaded is that module, and the reverse. A top-level name is served
this way only where Python's own search would find the framework's folder there: a user's
``callbacks.py`` stays the user's.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

SIBLINGS = ("callbacks", "strategies")
_HERE = Path(__file__).resolve().parent
# Where the framework's copies are: beside the trainer package and (as links, or copies in a wheel) inside it.
_FOLDERS = tuple(folder for name in SIBLINGS for folder in {(_HERE.parent / name).resolve(), (_HERE / name).resolve()})


def _twin(fullname: str) -> str | None:
    """The other name of a module of the two packages (``callbacks.bus`` <-> ``trainer.callbacks.bus``), or None."""
    head, _, rest = fullname.partition(".")
    if head in SIBLINGS:
        return f"trainer.{fullname}"
    if head == "trainer" and rest.partition(".")[0] in SIBLINGS:
        return rest
    return None


def is_framework_module(module: ModuleType | None) -> bool:
    """Whether ``module`` was loaded from the framework's own callbacks or strategies folder."""
    return _in_framework(getattr(module, "__file__", None))


def _in_framework(file: str | None) -> bool:
    if file is None:
        return False
    path = Path(file).resolve()
    return any(path.is_relative_to(folder) for folder in _FOLDERS)


class SiblingFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a module of the two packages from the one loaded under its other name (see the module's docstring)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        twin = _twin(fullname)
        if twin is None or not is_framework_module(sys.modules.get(twin)):
            return None
        if "." not in fullname:  # a top-level name: only where the normal search finds the framework's folder
            found = importlib.machinery.PathFinder.find_spec(fullname, path)
            if found is None or not _in_framework(found.origin):
                return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        twin = _twin(spec.name)
        assert twin is not None  # find_spec only answers for names that have a twin
        return sys.modules[twin]

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was run when it was loaded under its other name."""


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once per interpreter)."""
    if not any(isinstance(finder, SiblingFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SiblingFinder())


install()  # on import: trainer/__init__.py imports this module before anything else
