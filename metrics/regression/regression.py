"""Score-model metrics for CityClassifier as an `evaluate` module, loadable offline by path:
`evaluate.load("metrics/regression")`: mean absolute error and Spearman's rank correlation."""

import datasets
import evaluate
import numpy as np
from scipy import stats


class Regression(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: predicted scores (n,); references: true scores (n,).",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {"mae": float(np.abs(predictions - references).mean()),
                "spearman": float(stats.spearmanr(predictions, references).statistic)}
