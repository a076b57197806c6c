"""The one table of precision names: what ``Accelerator(mixed_precision=...)``, ``Trainer(precision=...)``,
the launch configuration's ``mixed_precision``, ``trainer launch --mixed_precision`` and
``trainer config`` accept, and which policy each name builds.

Adding a precision is one row here (and its policy class, if none of the existing ones fits).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trainer.precision.policies import Float16Precision, MixedPrecision, Precision


@dataclass(frozen=True)
class PrecisionName:
    """One precision: its canonical name, the other spellings that mean it, and how its policy is built.

    Args:
        name: the canonical name (``accelerator.mixed_precision``, the launch configuration's value).
        aliases: other spellings (Lightning's ``"bf16-mixed"``, torch's ``"bfloat16"``...), lower case.
        help: one line for the CLI and the docs.
        build: ``build(device, scaler_kwargs)`` returns the policy.
        dtype: the dtype the forward computes in (what a sharded strategy casts parameters to); None: fp32.
        listed: aliases that error messages list beside the canonical names.
        check: ``check(label)`` refuses the precision before any work where it cannot run at all.
    """

    name: str
    aliases: tuple[str, ...]
    help: str
    build: Callable[[torch.device, dict[str, Any]], Precision]
    dtype: torch.dtype | None = None
    listed: tuple[str, ...] = ()
    check: Callable[[str], None] | None = None


def _fp8(device: torch.device, scaler_kwargs: dict[str, Any]) -> Precision:
    from trainer.precision.fp8 import Float8Precision  # torchao is imported only when fp8 is used

    return Float8Precision(device)


def _check_fp8(label: str) -> None:
    from trainer.precision.fp8 import check_fp8_available

    check_fp8_available(label=label)


PRECISIONS: tuple[PrecisionName, ...] = (
    PrecisionName("no", ("fp32", "32", "32-true", "float32"), "full fp32: nothing is cast or scaled",
                  lambda device, scaler: Precision(device), listed=("fp32",)),
    PrecisionName("fp16", ("16", "16-mixed", "float16"), "fp16 autocast; the loss is scaled and overflowing steps skipped",
                  lambda device, scaler: Float16Precision(device, **scaler), dtype=torch.float16),
    PrecisionName("bf16", ("bf16-mixed", "bfloat16"), "bf16 autocast; parameters and gradients stay fp32",
                  lambda device, scaler: MixedPrecision(device, torch.bfloat16, "bf16"), dtype=torch.bfloat16),
    PrecisionName("fp8", ("float8",), "fp8 matmuls in the large Linear layers (torchao; GPUs of compute capability 8.9+)",
                  _fp8, dtype=torch.bfloat16, check=_check_fp8),
)


def precision_names() -> tuple[str, ...]:
    """The canonical names, in the table's order (the launch configuration's allowed values)."""
    return tuple(entry.name for entry in PRECISIONS)


def _entry(precision: str | None) -> PrecisionName:
    key = "no" if precision is None else str(precision).strip().lower()
    for entry in PRECISIONS:
        if key == entry.name or key in entry.aliases:
            return entry
    spellings = [name for entry in PRECISIONS for name in (entry.name, *entry.aliases)]
    close = difflib.get_close_matches(key, spellings, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    valid = [name for entry in PRECISIONS for name in (entry.name, *entry.listed)]
    raise ValueError(f"Unknown precision {precision!r}; valid values: {valid}.{hint}")


def precision_dtype(precision: str | None) -> torch.dtype | None:
    """The compute dtype of a precision name (``"bf16"`` -> ``torch.bfloat16``; ``"no"`` -> None)."""
    return _entry(precision).dtype


def canonical_precision(precision: str | None) -> str:
    """The canonical name (``"no"``, ``"fp16"``, ``"bf16"``, ``"fp8"``) of a precision string, or one clear error.

    A precision that cannot run here at all (fp8 without a GPU) is refused now, before any process
    group or device is touched.
    """
    entry = _entry(precision)
    if entry.check is not None:
        entry.check(repr(precision))
    return entry.name


def resolve_precision(precision: str | Precision | None, device: torch.device,
                      scaler_kwargs: dict[str, Any] | None = None, autocast_kwargs: dict[str, Any] | None = None) -> Precision:
    """Build the Precision object for a string; objects pass through.

    ``scaler_kwargs`` go to the fp16 policy's GradScaler; ``autocast_kwargs`` (``enabled``,
    ``cache_enabled``) to every ``torch.autocast`` the policy opens.
    """
    if isinstance(precision, Precision):
        return precision
    policy = _entry(canonical_precision(precision)).build(device, scaler_kwargs or {})
    policy.autocast_kwargs = dict(autocast_kwargs or {})
    return policy
