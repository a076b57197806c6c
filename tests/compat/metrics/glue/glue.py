"""GLUE's MRPC metric (accuracy and F1 of the positive class), as a local evaluate metric script."""

import datasets
import evaluate


class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name != "mrpc":
            raise KeyError(f"this local glue metric knows only 'mrpc', not {self.config_name!r}")
        return evaluate.MetricInfo(
            description="Accuracy and F1 on MRPC.", citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        pairs = list(zip(predictions, references))
        true_positive = sum(1 for p, r in pairs if p == 1 and r == 1)
        predicted, actual = sum(1 for p, _ in pairs if p == 1), sum(1 for _, r in pairs if r == 1)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"accuracy": sum(1 for p, r in pairs if p == r) / len(pairs), "f1": f1}
