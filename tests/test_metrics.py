from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from qtoolkit.evaluate.metrics import accuracy, confusion, f1, matthews, score


def test_hand_computed_mixed_case():
    labels, preds = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP 2, FN 1, TN 1, FP 1
    c = confusion(labels, preds)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 1)
    assert accuracy(labels, preds) == pytest.approx(3 / 5)
    assert f1(labels, preds) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # precision = recall = 2/3
    assert matthews(labels, preds) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))  # 1/6


def test_hand_computed_unbalanced_case():
    # TP 3, FP 2, FN 1, TN 4: precision 3/5, recall 3/4
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    p, r = 3 / 5, 3 / 4
    assert f1(labels, preds) == pytest.approx(2 * p * r / (p + r))
    assert accuracy(labels, preds) == pytest.approx(0.7)
    assert matthews(labels, preds) == pytest.approx((3 * 4 - 2 * 1) / math.sqrt(5 * 4 * 6 * 5))


def test_perfect_and_inverted():
    labels = [0, 1, 1, 0, 1]
    assert (accuracy(labels, labels), f1(labels, labels), matthews(labels, labels)) == (1.0, 1.0, 1.0)
    inverted = [1 - y for y in labels]
    assert accuracy(labels, inverted) == 0.0 and f1(labels, inverted) == 0.0
    assert matthews(labels, inverted) == pytest.approx(-1.0)


def test_degenerate_cases():
    # a constant classifier (the majority baseline): MCC has a zero factor in its denominator -> 0
    assert matthews([1, 0, 1, 1], [1, 1, 1, 1]) == 0.0
    assert matthews([1, 0, 1, 1], [0, 0, 0, 0]) == 0.0
    assert f1([1, 0, 1, 1], [1, 1, 1, 1]) == pytest.approx(2 * 3 / (2 * 3 + 1))  # F1 of "always positive"
    # no positive label and no positive prediction: F1 is 0/0 -> 0 (scikit-learn's convention)
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0
    assert accuracy([0, 0, 0], [0, 0, 0]) == 1.0
    assert matthews([0, 0, 0], [0, 0, 0]) == 0.0
    # only positives, all predicted: F1 1, MCC still undefined -> 0
    assert f1([1, 1], [1, 1]) == 1.0 and matthews([1, 1], [1, 1]) == 0.0
    assert matthews([1], [0]) == 0.0 and accuracy([1], [0]) == 0.0


def test_mcc_is_the_pearson_correlation_of_the_labels():
    rng = random.Random(0)
    for _ in range(20):
        labels = [rng.randint(0, 1) for _ in range(40)]
        preds = [rng.randint(0, 1) for _ in range(40)]
        assert matthews(labels, preds) == pytest.approx(np.corrcoef(labels, preds)[0, 1], abs=1e-12)


@pytest.mark.parametrize("labels, preds, message", [
    ([1, 0], [1], "2 labels but 1 predictions"),
    ([], [], "no examples"),
    ([0, 2], [0, 1], "in {0, 1}"),
])
def test_bad_inputs(labels, preds, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        accuracy(labels, preds)


def test_score_by_name():
    assert score(["f1", "accuracy"], [1, 0], [1, 1]) == {"f1": pytest.approx(2 / 3), "accuracy": 0.5}
