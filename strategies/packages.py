"""Optional backend packages: is one importable, and the one error that says how to install it.

Strategies ask before any work is done (before a process group exists), so a missing backend is
one clear sentence with the ``pip install`` line rather than a traceback from deep inside a run.
"""

from __future__ import annotations

import importlib.util
import sys


def package_available(module: str) -> bool:
    """Whether ``import module`` can succeed, without importing it (backends are slow to import).

    A ``None`` entry in ``sys.modules`` for the module or a parent marks it as unimportable.
    """
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name in sys.modules and sys.modules[name] is None:
            return False
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_package_message(what: str, package: str, install_hint: str) -> str:
    return f"{what} needs the {package} package, which is not installed. Install it with: {install_hint}"


def require_package(module: str, what: str, package: str, install_hint: str) -> None:
    """One clear ImportError, before any work, when ``module`` cannot be imported."""
    if not package_available(module):
        raise ImportError(missing_package_message(what, package, install_hint))
