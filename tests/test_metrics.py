"""Metrics: weighted and binary F1, fitted binary cut-offs, ROC-AUC on splits lacking a class,
Kaggle's log-loss clipping, and how NaN compares."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, log_loss, roc_auc_score

from pipeline.base.config import METRICS, ConfigError, load_config
from pipeline.base.metrics import (
    METRIC_FUNCTIONS,
    cutoff_candidates,
    fit_cutoff,
    is_better,
    labels_at_cutoff,
    score,
    score_at_cutoff,
)
from tests.conftest import make_competition


def binary_probs(positive: np.ndarray) -> np.ndarray:
    positive = np.asarray(positive, dtype=np.float64)
    return np.stack([1 - positive, positive], axis=1)


def test_every_metric_is_known_to_the_config():
    assert set(METRICS) == set(METRIC_FUNCTIONS)
    assert {"weighted_f1", "binary_f1"} <= set(METRICS)


def test_weighted_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60)
    expected = f1_score(targets, probs.argmax(1), average="weighted")
    assert score("weighted_f1", targets, probs) == pytest.approx(expected)
    assert score("weighted_f1", targets, probs) != pytest.approx(score("macro_f1", targets, probs))


def test_binary_f1_is_the_positive_class_at_one_half():
    targets = np.array([1, 1, 1, 0, 0, 0])
    positive = np.array([0.9, 0.5, 0.2, 0.6, 0.1, 0.4])  # predicted positive: 0.9, 0.5, 0.6
    # tp 2, fp 1, fn 1 -> F1 = 4 / 6
    assert score("binary_f1", targets, binary_probs(positive)) == pytest.approx(2 / 3)
    assert score("binary_f1", targets, binary_probs(positive)) == pytest.approx(
        f1_score(targets, positive >= 0.5))
    # class 0 as the positive one: predicted class 0 where p(class 0) >= 0.5
    assert score("binary_f1", targets, binary_probs(positive), positive=0) == pytest.approx(
        f1_score(targets == 0, (1 - positive) >= 0.5))


def test_binary_f1_needs_two_classes(tmp_path):
    path = make_competition(tmp_path, ["a", "b", "c"] * 2)
    with pytest.raises(ConfigError, match=r"metric: binary_f1 needs exactly two classes"):
        load_config(str(path), None, ["data.metric=binary_f1"])
    assert load_config(str(path), None, ["data.metric=weighted_f1"]).data.metric == "weighted_f1"


def test_fit_cutoff_finds_the_separating_point():
    # Positives sit at 0.2-0.3, negatives at 0.0-0.1: at 0.5 nothing is positive (F1 0).
    rng = np.random.default_rng(1)
    positive = np.concatenate([rng.uniform(0.2, 0.3, 30), rng.uniform(0.0, 0.1, 70)])
    targets = np.array([1] * 30 + [0] * 70)
    probs = binary_probs(positive)
    assert score("binary_f1", targets, probs) == 0.0
    cutoff = fit_cutoff(targets, positive, "binary_f1")
    assert 0.1 < cutoff <= positive[:30].min()
    assert score_at_cutoff("binary_f1", targets, probs, cutoff) == pytest.approx(1.0)
    assert labels_at_cutoff(probs, cutoff).tolist() == targets.tolist()


@pytest.mark.parametrize("metric", ["binary_f1", "weighted_f1", "macro_f1", "accuracy"])
def test_fit_cutoff_is_the_best_candidate_by_sklearn(metric):
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, 200)
    positive = np.clip(0.35 * targets + rng.normal(0.3, 0.2, 200), 0, 1)
    cutoff = fit_cutoff(targets, positive, metric)
    assert cutoff in cutoff_candidates(positive)

    def sklearn_score(c):
        predicted = (positive >= c).astype(int)
        if metric == "accuracy":
            return float((predicted == targets).mean())
        average = {"binary_f1": "binary", "weighted_f1": "weighted", "macro_f1": "macro"}[metric]
        return f1_score(targets, predicted, average=average, zero_division=0)

    best = max(sklearn_score(c) for c in cutoff_candidates(positive))
    assert sklearn_score(cutoff) == pytest.approx(best)
    assert score_at_cutoff(metric, targets, binary_probs(positive), cutoff) == pytest.approx(best)
    assert best >= sklearn_score(0.5)  # 0.5 is a candidate: never worse in sample


def test_fit_cutoff_positive_class_zero():
    targets = np.array([0, 0, 1, 1])
    p_zero = np.array([0.3, 0.25, 0.1, 0.05])  # class 0 is the positive one; its probabilities
    cutoff = fit_cutoff(targets, p_zero, "binary_f1", positive=0)
    probs = np.stack([p_zero, 1 - p_zero], axis=1)
    assert score_at_cutoff("binary_f1", targets, probs, cutoff, positive=0) == pytest.approx(1.0)


def test_fit_cutoff_refuses_probability_metrics():
    with pytest.raises(ValueError, match="not 'roc_auc'"):
        fit_cutoff(np.array([0, 1]), np.array([0.2, 0.8]), "roc_auc")


def test_roc_auc_over_the_classes_present_with_a_warning(capsys):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), 40)
    targets = rng.choice([0, 1, 3], 40)  # class 2 has no row in this split
    value = score("roc_auc", targets, probs)
    present = probs[:, [0, 1, 3]] / probs[:, [0, 1, 3]].sum(1, keepdims=True)
    assert value == pytest.approx(roc_auc_score(targets, present, multi_class="ovr",
                                                labels=[0, 1, 3]))
    assert "roc_auc scored over the 3 classes present" in capsys.readouterr().err


def test_roc_auc_two_of_three_classes_is_a_number():
    targets = np.array([0, 0, 2, 2])
    probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1]])
    share = probs[:, 2] / (probs[:, 0] + probs[:, 2])
    value = score("roc_auc", targets, probs)
    assert not math.isnan(value)
    assert value == pytest.approx(roc_auc_score(targets == 2, share))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_roc_auc_with_one_class_is_nan(n_classes, capsys):
    probs = np.full((3, n_classes), 1 / n_classes)
    assert math.isnan(score("roc_auc", np.array([1, 1, 1]), probs))
    assert "undefined" in capsys.readouterr().err


def test_log_loss_clips_like_kaggle():
    targets = np.array([0, 1])
    probs = np.array([[0.0, 1.0], [0.2, 0.8]])  # a confident miss: p(true) = 0
    expected = -(math.log(1e-15) + math.log(0.8)) / 2
    assert score("log_loss", targets, probs) == pytest.approx(expected, rel=1e-9)
    ordinary = np.array([[0.7, 0.3], [0.4, 0.6]])
    assert score("log_loss", targets, ordinary) == pytest.approx(log_loss(targets, ordinary))


def test_is_better_never_prefers_nan():
    nan = float("nan")
    assert is_better("accuracy", 0.5, None) and is_better("accuracy", 0.5, nan)
    assert not is_better("accuracy", nan, 0.5) and not is_better("accuracy", nan, nan)
    assert not is_better("accuracy", nan, None)
    assert is_better("log_loss", 0.2, 0.3) and not is_better("log_loss", 0.3, 0.2)
    assert is_better("roc_auc", 0.7, 0.6) and not is_better("roc_auc", 0.6, 0.6)
