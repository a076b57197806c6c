"""Accuracy: the fraction of predictions equal to their references."""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="The fraction of predictions equal to their references.",
            citation="",
            inputs_description="predictions and references: integer class labels.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        if sample_weight is not None:
            correct = correct * np.asarray(sample_weight, dtype=np.float64)
        total = correct.sum()
        if normalize:
            total /= np.sum(sample_weight) if sample_weight is not None else len(correct)
        return {"accuracy": float(total)}
