"""Classification metrics of the GLUE tasks: accuracy, F1 and Matthews correlation (binary labels).

All three are functions of the confusion counts of binary labels (1 = the positive class):

    accuracy = (TP + TN) / n
    F1       = 2 TP / (2 TP + FP + FN)                        (MRPC: class 1 = "equivalent")
    MCC      = (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN))          (CoLA)

Degenerate cases follow scikit-learn's conventions, so figures match what the GLUE literature
computed with it: F1 = 0 when there is no positive prediction and no positive label (0/0), and
MCC = 0 when any factor of its denominator is zero (all predictions, or all labels, one class; a
constant classifier, such as the majority baseline, scores MCC 0). Values are fractions; GLUE tables
multiply them by 100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn


def confusion(labels: Sequence[int], predictions: Sequence[int]) -> Confusion:
    """Confusion counts of two equally long, non-empty sequences of 0/1 labels."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    tp = fp = fn = tn = 0
    for y, p in zip(labels, predictions, strict=True):
        y, p = int(y), int(p)
        if y not in (0, 1) or p not in (0, 1):
            raise ValueError(f"binary metrics need labels and predictions in {{0, 1}}, got {y} and {p}")
        if p:
            tp, fp = tp + y, fp + (1 - y)
        else:
            fn, tn = fn + y, tn + (1 - y)
    return Confusion(tp, fp, fn, tn)


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    c = confusion(labels, predictions)
    return (c.tp + c.tn) / c.n


def f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """F1 of the positive class (1); 0 when there is neither a positive label nor a positive prediction."""
    c = confusion(labels, predictions)
    denominator = 2 * c.tp + c.fp + c.fn
    return 2 * c.tp / denominator if denominator else 0.0


def matthews(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Matthews correlation coefficient in [-1, 1]; 0 when a row or column of the confusion matrix is empty."""
    c = confusion(labels, predictions)
    denominator = (c.tp + c.fp) * (c.tp + c.fn) * (c.tn + c.fp) * (c.tn + c.fn)
    if denominator == 0:
        return 0.0
    return (c.tp * c.tn - c.fp * c.fn) / math.sqrt(denominator)


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": matthews}
METRIC_TITLES = {"accuracy": "accuracy", "f1": "F1", "mcc": "MCC"}


def score(names: Sequence[str], labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """{name: value} of the named metrics (see METRICS)."""
    return {name: METRICS[name](labels, predictions) for name in names}


__all__ = ["METRICS", "METRIC_TITLES", "Confusion", "accuracy", "confusion", "f1", "matthews", "score"]
