"""Exact-value checks shared by the worker scripts that torchrun starts (one per rank)."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

RANK = int(os.environ.get("RANK", "0"))


def say(line: str) -> None:
    """One write per line, so lines of the two ranks do not interleave in the shared pipe."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fail(what: str, expected: Any, actual: Any) -> None:
    raise AssertionError(f"rank {RANK}: {what}: expected {expected!r} ({type(expected).__name__}), "
                         f"got {actual!r} ({type(actual).__name__})")


def expect(actual: Any, expected: Any, what: str) -> None:
    if type(actual) is not type(expected) or actual != expected:
        fail(what, expected, actual)


def same(actual: Any, expected: Any) -> bool:
    """Exact equality of nested structures; tensors must match in dtype, shape and values."""
    if torch.is_tensor(expected):
        return torch.is_tensor(actual) and actual.dtype == expected.dtype and torch.equal(actual, expected)
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(same(actual[k], expected[k]) for k in expected)
    if isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(same(a, e) for a, e in zip(actual, expected, strict=True))
    return actual == expected


def expect_same(actual: Any, expected: Any, what: str) -> None:
    if not same(actual, expected):
        fail(what, expected, actual)


def leave() -> None:
    """Exit without interpreter teardown: on a loaded machine, gloo's threads occasionally make a
    finished process abort during teardown ("terminate called without an active exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
