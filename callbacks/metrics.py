"""``Metrics``: compute ``evaluate`` metrics on each validation's predictions, gathered from every process.

``validation_step`` returns the batch's ``predictions`` and ``references`` beside its scalar
metrics; this callback gathers them with ``gather_for_metrics`` (so samples duplicated to even
out the last batch are dropped), computes the metric once on the main process over the whole
validation set, shares the result with every process, and logs it (``val_accuracy`` ...), so
early stopping and checkpoint selection can watch it and trackers record it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .base import Callback
from .metric_scripts import script_path

if TYPE_CHECKING:
    from .protocols import TrainerView

PREDICTIONS, REFERENCES = "predictions", "references"


def load_metric(metric: Any) -> Any:
    """An ``evaluate`` module from a module, a bundled name (``"accuracy"``, ``"f1"``, ``"mse"``), a path
    or hub name, or a list of these (combined with ``evaluate.combine``)."""
    if importlib.util.find_spec("evaluate") is None:
        raise ImportError("The Metrics callback needs the 'evaluate' package. "
                          "Install it with: pip install 'trainer-kit[metrics]'")
    import evaluate

    if isinstance(metric, str):
        return evaluate.load(script_path(metric) or metric)
    if isinstance(metric, Sequence):
        return evaluate.combine([load_metric(m) for m in metric])
    if not hasattr(metric, "compute"):
        raise TypeError(f"Metrics takes an evaluate module, a metric name or path, or a list of them; got {metric!r}.")
    return metric


class Metrics(Callback):
    """Args:
        metric: an ``evaluate`` module or combination, a name or path, a list of them, or a dict
            ``{metric: compute kwargs}`` when metrics need different arguments
            (``{"accuracy": {}, "f1": {"average": "macro"}}``).
        prefix: put before each result's name when logged (``"val_"`` gives ``val_accuracy``).
        transform: ``(outputs, batch) -> (predictions, references)``, for a ``validation_step``
            that does not return ``predictions`` and ``references`` in its dict.
        compute_kwargs: passed to every metric's ``compute`` (e.g. ``{"average": "macro"}`` for f1).
    """

    computes_metrics = True  # the bus runs it before callbacks that read the metrics

    def __init__(self, metric: Any, prefix: str = "val_", transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
                 compute_kwargs: Mapping[str, Any] | None = None) -> None:
        if isinstance(metric, Mapping):
            self.metrics = [(load_metric(name), {**(compute_kwargs or {}), **kwargs}) for name, kwargs in metric.items()]
        elif isinstance(metric, (list, tuple)):
            self.metrics = [(load_metric(m), dict(compute_kwargs or {})) for m in metric]
        else:
            self.metrics = [(load_metric(metric), dict(compute_kwargs or {}))]
        self.prefix = prefix
        self.transform = transform or _from_outputs
        self._predictions: list[Any] = []
        self._references: list[Any] = []

    def on_validation_start(self, trainer: TrainerView) -> None:
        self._predictions.clear()
        self._references.clear()

    def on_validation_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        predictions, references = self.transform(outputs, batch)
        predictions, references = trainer.accelerator.gather_for_metrics((predictions, references))
        if trainer.is_main_process:
            self._predictions.append(_to_list(predictions))
            self._references.append(_to_list(references))

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        results = None
        if trainer.is_main_process:
            predictions = [p for batch in self._predictions for p in batch]
            references = [r for batch in self._references for r in batch]
            results = {}
            for metric, kwargs in self.metrics:
                computed = metric.compute(predictions=predictions, references=references, **kwargs)
                results.update({f"{self.prefix}{name}": float(value) for name, value in computed.items()
                                if isinstance(value, (int, float)) or (hasattr(value, "ndim") and value.ndim == 0)})
        results = trainer.accelerator.strategy.broadcast_object(results)
        trainer.log_dict(results)
        metrics.update(results)  # callbacks after this one, and validate()'s return value, see the results
        self._predictions.clear()
        self._references.clear()


def _from_outputs(outputs: Any, batch: Any) -> tuple[Any, Any]:
    if isinstance(outputs, Mapping) and PREDICTIONS in outputs and REFERENCES in outputs:
        return outputs[PREDICTIONS], outputs[REFERENCES]
    raise KeyError(
        "The Metrics callback needs predictions and references: return them from validation_step, e.g. "
        "{'val_loss': loss, 'predictions': logits.argmax(-1), 'references': y}, or pass transform=(outputs, batch) -> "
        "(predictions, references)."
    )


def _to_list(values: Any) -> list[Any]:
    if torch.is_tensor(values):
        return values.detach().cpu().tolist()
    return list(values)
