"""Mean squared error (or its root with squared=False) between predictions and references."""

import datasets
import evaluate
import numpy as np


class MSE(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean squared error.",
            citation="",
            inputs_description="predictions and references: numbers.",
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references, squared=True):
        error = float(np.mean((np.asarray(predictions, dtype=np.float64) - np.asarray(references, dtype=np.float64)) ** 2))
        return {"mse": error if squared else float(np.sqrt(error))}
