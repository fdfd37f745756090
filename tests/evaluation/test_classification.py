"""Classification metrics against scikit-learn and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from oncoslide.evaluation import balanced_accuracy, classification_metrics, roc_auc
from oncoslide.survival.metrics import MetricInputError


def test_binary_auc_hand_worked() -> None:
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 beats 1 of 2, 0.8 beats 2 -> 3/4.
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, p) == pytest.approx(0.75)
    assert roc_auc(y, np.column_stack((1 - p, p))) == pytest.approx(0.75)
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))


def test_binary_auc_closed_forms() -> None:
    y = np.array(["neg", "neg", "neg", "pos", "pos"])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert roc_auc(y, p) == 1.0
    assert roc_auc(y, 1 - p) == 0.0
    assert roc_auc(y, np.full(5, 0.5)) == 0.5
    # The positive class is classes[1]: swapping the order flips the AUC.
    assert roc_auc(y, p, classes=["pos", "neg"]) == 0.0


def test_binary_auc_matches_sklearn_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    p = np.round(rng.uniform(size=200) + 0.3 * y, 1)  # ties included
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_multiclass_macro_ovr_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4)) + np.eye(4)[y]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = roc_auc_score(y, prob, multi_class="ovr", average="macro")
    assert roc_auc(y, prob) == pytest.approx(expected, abs=1e-12)
    names = np.array(["a", "b", "c", "d"])
    assert roc_auc(names[y], prob, classes=names) == pytest.approx(expected, abs=1e-12)


def test_multiclass_absent_class_is_left_out_of_the_macro_average() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=100)  # class 2 never occurs
    prob = rng.dirichlet(np.ones(3), size=100)
    expected = np.mean([roc_auc_score(y == k, prob[:, k]) for k in (0, 1)])
    assert roc_auc(y, prob, classes=[0, 1, 2]) == pytest.approx(expected)


def test_single_class_auc_is_nan() -> None:
    assert np.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9], classes=[0, 1]))
    assert np.isnan(roc_auc([2, 2], np.full((2, 3), 1 / 3), classes=[0, 1, 2]))


def test_balanced_accuracy_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=150)
    prob = rng.dirichlet(np.ones(3), size=150) + 0.5 * np.eye(3)[y]
    pred = prob.argmax(axis=1)
    expected = balanced_accuracy_score(y, pred)
    assert balanced_accuracy(y, prob) == pytest.approx(expected)
    assert balanced_accuracy(y, pred) == pytest.approx(expected)


def test_balanced_accuracy_binary_probabilities_and_closed_form() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.2, 0.3, 0.9, 0.5])  # 0.5 is not above the threshold
    # recall(0) = 3/4, recall(1) = 1/2
    assert balanced_accuracy(y, p) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p > 0.5))
    assert balanced_accuracy(["a", "b"], ["b", "a"]) == 0.0


def test_classification_metrics_keys_and_values() -> None:
    y = np.array(["x", "y", "y", "x"])
    prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    assert classification_metrics(y, prob, ["x", "y"]) == {"auc": 1.0, "balanced_accuracy": 1.0}


def test_bad_inputs_raise_typed_errors() -> None:
    with pytest.raises(MetricInputError, match="rows"):
        roc_auc([0, 1, 1], [0.2, 0.4])
    with pytest.raises(MetricInputError, match="not in classes"):
        roc_auc([0, 1, 3], np.full((3, 2), 0.5), classes=[0, 1])
    with pytest.raises(MetricInputError, match="columns"):
        roc_auc([0, 1, 2], np.full((3, 2), 0.5))
    with pytest.raises(MetricInputError, match="non-finite"):
        roc_auc([0, 1], [np.nan, 0.3])
    with pytest.raises(MetricInputError, match="not in classes"):
        balanced_accuracy(["a", "b"], ["a", "c"])
    with pytest.raises(MetricInputError, match="duplicates"):
        balanced_accuracy([0, 1], [0, 1], classes=[0, 0, 1])
