"""Classification metrics for CityClassifier as an `evaluate` module, loadable offline by path:
`evaluate.load("metrics/classification")`.

Accuracy, precision, recall and F1 (binary for two labels, else macro, plus per label), ROC AUC and
PR AUC from the positive-class score (one-vs-rest macro for more labels), and expected calibration
error over 10 equal-width bins of the top-label confidence.
"""

import datasets
import evaluate
import numpy as np
from sklearn import metrics

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label ids, shape (n,).
    references: true label ids, shape (n,).
    scores: per-label probabilities, shape (n, num_labels); optional, needed for ROC/PR AUC and ECE.
    pos_label: the label counted as positive with two labels (default 1).
Returns:
    accuracy, precision, recall, f1, and with scores roc_auc, pr_auc, ece; plus per_label lists
    of precision/recall/f1 and support.
"""


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # scores is a compute keyword, not a feature, so that it stays optional
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, scores=None, pos_label=1):
        predictions, references = np.asarray(predictions), np.asarray(references)
        num_labels = int(max(predictions.max(initial=0), references.max(initial=0))) + 1
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float64)
            num_labels = max(num_labels, scores.shape[1])
        labels = list(range(num_labels))
        average = "binary" if num_labels == 2 else "macro"
        kwargs = {"pos_label": pos_label} if average == "binary" else {"labels": labels}
        result = {
            "accuracy": float(metrics.accuracy_score(references, predictions)),
            "precision": float(metrics.precision_score(references, predictions, average=average, zero_division=0,
                                                       **kwargs)),
            "recall": float(metrics.recall_score(references, predictions, average=average, zero_division=0, **kwargs)),
            "f1": float(metrics.f1_score(references, predictions, average=average, zero_division=0, **kwargs)),
        }
        p, r, f, support = metrics.precision_recall_fscore_support(
            references, predictions, labels=labels, zero_division=0)
        result["per_label"] = {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(),
                               "support": support.tolist()}
        if scores is not None and len(np.unique(references)) > 1:
            if num_labels == 2:
                positive = references == pos_label
                result["roc_auc"] = float(metrics.roc_auc_score(positive, scores[:, pos_label]))
                result["pr_auc"] = float(metrics.average_precision_score(positive, scores[:, pos_label]))
            else:
                onehot = np.eye(num_labels)[references]
                present = onehot.sum(0) > 0
                result["roc_auc"] = float(metrics.roc_auc_score(onehot[:, present], scores[:, present],
                                                                average="macro"))
                result["pr_auc"] = float(metrics.average_precision_score(onehot[:, present], scores[:, present],
                                                                         average="macro"))
        if scores is not None:
            result["ece"] = expected_calibration_error(scores, references)
        return result


def expected_calibration_error(scores, references, bins=10):
    """Sum over confidence bins of |accuracy - confidence| weighted by the bin's share of samples."""
    confidence, predicted = scores.max(1), scores.argmax(1)
    correct = predicted == references
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)
