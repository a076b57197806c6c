"""Precision: the policies (``policies``), fp8 (``fp8``, imported on first use) and the one table of names (``names``)."""

from trainer.precision.names import PRECISIONS, PrecisionName, canonical_precision, precision_names, resolve_precision
from trainer.precision.policies import Float16Precision, MixedPrecision, Precision, SkippedStepsError

__all__ = ["PRECISIONS", "Float16Precision", "MixedPrecision", "Precision", "PrecisionName", "SkippedStepsError",
           "canonical_precision", "precision_names", "resolve_precision"]
