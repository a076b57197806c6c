"""Arguments a user passes that a function does not take: one clear error, with the closest name and the valid ones."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any


def unknown_argument_error(caller: str, function: Callable[..., Any], unknown: Mapping[str, Any],
                           hints: Mapping[str, str] | None = None) -> TypeError:
    """The TypeError for the first of ``unknown`` (keyword arguments ``function`` does not take), to raise.

    ``hints`` gives the sentence to show for a name another library uses, instead of a did-you-mean.
    """
    known = [name for name, parameter in inspect.signature(function).parameters.items()
             if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    name = next(iter(unknown))
    if hints is not None and name in hints:
        hint = f" {hints[name]}"
    else:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
    return TypeError(f"{caller}() got an unexpected argument {name!r}.{hint} Valid arguments: {known}.")
