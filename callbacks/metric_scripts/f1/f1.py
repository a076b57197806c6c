"""F1: the harmonic mean of precision and recall, binary or averaged over classes ("macro", "micro", "weighted")."""

import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="F1 score: 2 * precision * recall / (precision + recall).",
            citation="",
            inputs_description="predictions and references: integer class labels.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if average == "binary":
            return {"f1": _f1(predictions == pos_label, references == pos_label)}
        if average == "micro":  # single-label: micro F1 equals accuracy
            return {"f1": float(np.mean(predictions == references))}
        labels = np.unique(np.concatenate([predictions, references]))
        scores = np.array([_f1(predictions == label, references == label) for label in labels])
        if average == "macro":
            return {"f1": float(scores.mean())}
        if average == "weighted":
            support = np.array([np.sum(references == label) for label in labels], dtype=np.float64)
            return {"f1": float((scores * support).sum() / support.sum())}
        raise ValueError(f"average={average!r}: use 'binary', 'micro', 'macro' or 'weighted'.")


def _f1(predicted: np.ndarray, actual: np.ndarray) -> float:
    true_positive = float(np.sum(predicted & actual))
    denominator = float(np.sum(predicted) + np.sum(actual))
    return 2.0 * true_positive / denominator if denominator else 0.0
