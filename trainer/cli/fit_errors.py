"""jsonargparse's errors as one line each: the key, what is wrong, and the closest name that exists.

jsonargparse explains a mistake over several indented lines (``Parser key "model": Problem with
given class_path ...``). ``trainer fit`` prints one line, as every ``trainer`` command does, and adds
what jsonargparse leaves out: the flag, key, class or argument that was probably meant.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import typing
from typing import Any

from trainer.cli.errors import one_line

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)")
_GROUP_KEY = re.compile(r"Group '([^']+)' does not accept (?:nested )?(?:key|option) '([^']+)'")
_KEY_NOT_EXPECTED = re.compile(r"[Kk]ey '([^']+)' is not expected")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':\s*(.*)", re.DOTALL)
_NO_ATTRIBUTE = re.compile(r"module '([^']+)' has no attribute '([^']+)'")
_NOT_ACCEPTED = re.compile(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)")
_UNION = re.compile(r"Subtypes: \[([^\n]*)\][ \t]*\n.*?Given value: (.*)$", re.DOTALL)
_EXPECTED = re.compile(r"Expected an? (.+?)\. Got value: (.*)$", re.DOTALL)
_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")
_MODULE_PREFIX = re.compile(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)")
_NOT_SUBCLASS = re.compile(r"Import path (?:(\S+) )?does not correspond to a subclass of (\w+)")
_BARE_NAME = re.compile(r"Expected a dot import path string: (\S+)")
HELP = "See `trainer fit --help`."
# Trainer arguments that trainer fit fills from a section of its own, and the key to set instead.
ELSEWHERE = {"model": "model", "optimizer": "optimizer", "scheduler": "lr_scheduler", "train_data": "data.train_data",
             "eval_data": "data.eval_data"}


def _closest(word: str, choices: list[str]) -> str | None:
    """The choice closest to ``word``, case aside (``Adamw`` -> ``AdamW``), or None when none is close."""
    by_lower = {choice.lower(): choice for choice in reversed(choices)}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def _closest_flag(parser: argparse.ArgumentParser, flag: str) -> str | None:
    """The flag meant: the closest one, or the closest section with the rest kept (``--modle.hidden`` -> ``--model.hidden``)."""
    flags = [option for option in _flags(parser) if not option.endswith(".help")]
    head, dot, tail = flag[2:].partition(".")
    sections = sorted({option[2:].partition(".")[0] for option in flags})
    if dot and head not in sections:
        section = _closest(head, sections)
        return f"--{section}.{tail}" if section else None
    return _closest(flag, flags)


def _keys(parser: argparse.ArgumentParser) -> list[str]:
    return [option[2:] for option in _flags(parser)]


def _did_you_mean(close: str | None) -> str:
    """``; did you mean X?``, or ``.`` when nothing is close: the end of a sentence either way."""
    return f"; did you mean {close}?" if close else "."


def _split_top_level(text: str) -> list[str]:
    """``"list[A], <class 'B'>"`` -> ``["list[A]", "<class 'B'>"]``: commas inside brackets do not split."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return [part.strip() for part in [*parts, text[start:]] if part.strip()]


def _type_names(text: str) -> str:
    """``int or None``, ``list[Callback] or None``: the types jsonargparse lists, without their modules."""
    names = []
    for part in _split_top_level(text):
        part = _MODULE_PREFIX.sub(r"\1", _CLASS_REPR.sub(r"\1", part))
        names.append("None" if part == "NoneType" else part)
    return " or ".join(dict.fromkeys(names)) or one_line(text)


def _classes_in(typehint: Any) -> list[type]:
    """The classes a type hint names (inside Optional, list[...], Callable[..., X]...), builtins left out."""
    if isinstance(typehint, list):
        return [found for item in typehint for found in _classes_in(item)]
    if inspect.isclass(typehint) and typehint.__module__ != "builtins" and not typing.get_args(typehint):
        return [typehint]
    return [found for argument in typing.get_args(typehint) for found in _classes_in(argument)]


def _subclasses(base: type) -> dict[str, str]:
    """Every loaded subclass of ``base`` (and ``base``) by class name: name -> import path."""
    found: dict[str, str] = {}
    pending = [base]
    while pending:
        cls = pending.pop()
        path = f"{cls.__module__}.{cls.__qualname__}"
        if not cls.__name__.startswith("_") and (cls.__name__ not in found or  # torch's own class wins a shared name
                                                 (path.startswith("torch.") and not found[cls.__name__].startswith("torch."))):
            found[cls.__name__] = path
        pending.extend(cls.__subclasses__())
    return found


def _unknown_class_name(parser: argparse.ArgumentParser, key: str, name: str) -> str:
    """``optimizer: no class named 'Adamw'; did you mean AdamW (torch.optim.adamw.AdamW)?``"""
    action = next((a for a in parser._actions if a.dest == key), None)
    known: dict[str, str] = {}
    for base in _classes_in(getattr(action, "_typehint", None)):
        known.update(_subclasses(base))
    close = _closest(name, list(known))
    if close:
        return f"{key}: no class named {name!r}; did you mean {close} ({known[close]})?"
    return f"{key}: no class named {name!r} is loaded: give its full class_path, module.Class."


def _wrong_type(key: str, message: str) -> str | None:
    """``key: expected int or None, got 'two'`` for a value of the wrong type (a Union's too)."""
    union = _UNION.search(message)
    if union:
        return f"{key}: expected {_type_names(union.group(1))}, got {one_line(union.group(2))!r}."
    expected = _EXPECTED.search(message)
    if expected:
        return f"{key}: expected {_type_names(expected.group(1))}, got {one_line(expected.group(2))!r}."
    return None


def _class_members(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # the module itself is the problem: nothing to suggest
        return []
    return [f"{module_name}.{name}" for name, value in vars(module).items()
            if not name.startswith("_") and callable(value)]


def _parameters(class_path: str) -> list[str]:
    module_name, _, name = class_path.rpartition(".")
    try:
        target: Any = getattr(importlib.import_module(module_name), name)
        return [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]
    except Exception:
        return []


def _class_path_problem(key: str, class_path: str, detail: str) -> str:
    """``model: ...`` for a class_path that cannot be imported or does not take an argument."""
    first = one_line(detail.strip().splitlines()[0]) if detail.strip() else "it cannot be used"
    missing = _NO_ATTRIBUTE.search(detail)
    if missing:
        module_name = missing.group(1)
        close = _closest(class_path, _class_members(module_name))
        return f"{key}: cannot import class_path {class_path!r}: {first}{_did_you_mean(close)}"
    not_accepted = _NOT_ACCEPTED.search(detail)
    if not_accepted:
        wrong = not_accepted.group(1)
        close = _closest(wrong, _parameters(class_path))
        hint = f"; did you mean {close!r}?" if close else f"; it takes {', '.join(_parameters(class_path)) or 'none'}."
        return f"{key}: {class_path} takes no argument {wrong!r}{hint}"
    if first.startswith("No module named"):
        return (f"{key}: cannot import class_path {class_path!r}: {first}; check the spelling, and run from the folder "
                "that holds the module (it is importable from there).")
    return f"{key}: class_path {class_path!r}: {one_line(detail)}"


def explain(parser: argparse.ArgumentParser, error: BaseException) -> str:
    """One line for ``error``, a jsonargparse parse error, with a did-you-mean where a name was misspelt."""
    message = str(error)
    unrecognized = _UNRECOGNIZED.search(message)
    if unrecognized:
        flag = unrecognized.group(1).split("=")[0]
        if not flag.startswith("-"):
            return f"unexpected argument {flag!r}: config files and the Trainer class come before the first flag, every other " \
                   f"value follows its --section.key flag. {HELP}"
        return f"unknown option {flag}{_did_you_mean(_closest_flag(parser, flag))} {HELP}"
    group_key = _GROUP_KEY.search(message)
    if group_key:
        group, key = group_key.groups()
        wrong = f"{group}.{key}"
        if group == "trainer" and key in ELSEWHERE:
            return f"{wrong}: set {ELSEWHERE[key]} instead (a section of its own, built before the Trainer). {HELP}"
        close = _closest(wrong, [k for k in _keys(parser) if k.startswith(f"{group}.")])
        return f"{wrong} is not a key of the {group} section{_did_you_mean(close)} {HELP}"
    not_expected = _KEY_NOT_EXPECTED.search(message)
    if not_expected and "class_path" not in message:
        wrong = not_expected.group(1)
        return f"{wrong} is not a key of the config{_did_you_mean(_closest(wrong, _keys(parser)))} {HELP}"
    parser_key = _PARSER_KEY.search(message)
    not_accepted = _NOT_ACCEPTED.search(message)
    if not parser_key and not_accepted:  # a top-level key of a config file
        wrong = not_accepted.group(1)
        close = _closest_flag(parser, f"--{wrong}")
        return f"{wrong} is not a key of the config{_did_you_mean(close[2:] if close else None)} {HELP}"
    key = parser_key.group(1) if parser_key else "config"
    class_path = _CLASS_PATH.search(message)
    if class_path:
        return _class_path_problem(key, class_path.group(1), class_path.group(2))
    bare = _BARE_NAME.search(message)
    if parser_key and bare:
        return _unknown_class_name(parser, key, bare.group(1))
    union, not_subclass = _UNION.search(message), _NOT_SUBCLASS.search(message)
    if parser_key and not_subclass:
        given = one_line(union.group(2)) if union else not_subclass.group(1)
        kinds = [name for name in _type_names(union.group(1)).split(" or ") if name != "None"] if union else \
            [not_subclass.group(2)]
        return (f"{key}: {given} is neither a {' or '.join(kinds)} class nor a function annotated to return one "
                f"(def make(...) -> {kinds[0]}).")
    if parser_key:
        return _wrong_type(key, message) or f"{key}: {one_line(message[parser_key.end():])}"
    return one_line(message)
