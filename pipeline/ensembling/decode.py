"""From probabilities to the labels a submission holds, and honest scores of what is fitted.

    python -m pipeline ensemble --data retina ensemble.decode=thresholds   # used by the ensemble

Two decoders are fitted on out-of-fold (OOF) predictions:
- thresholds (ordinal competitions, QWK): the expected grade sum_k k * p_k is cut by C-1
  thresholds, found by coordinate search from 0.5, 1.5, ...;
- a cut-off (binary competitions scored on labels: binary_f1, weighted_f1, macro_f1, accuracy):
  the positive class where its probability reaches the cut-off.

Whatever is fitted on OOF rows scores too well on those same rows (the in-sample figure). The
honest estimate (README.md, "Honest scores") is `nested`: for each fold, fit on the other folds'
rows, apply to the held one, and score the assembled predictions. The issue that asked for this
reported, on an ordinal competition's OOF (900 rows, 5 grades), +0.028 QWK in sample against
+0.002 nested; tests/test_ensemble.py shows the gap on noise.
A decoder is used only when its nested score beats argmax's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.base.metrics import (
    CUTOFF_METRICS,
    fit_cutoff,
    labels_at_cutoff,
    quadratic_weighted_kappa,
    score_labels,
)
from pipeline.base.task import Decoder, Task


def expected_grade(probs: np.ndarray) -> np.ndarray:
    """sum_k k * p_k per row (N,): a continuous grade that thresholds cut into classes."""
    return probs @ np.arange(probs.shape[1], dtype=np.float64)


def grade_to_probs(grades: np.ndarray, n_classes: int) -> np.ndarray:
    """Grades (..., N) -> (..., N, C): each grade as a two-point distribution between the grades
    around it (2.3 -> 0.7 on grade 2, 0.3 on grade 3), after clipping to [0, C-1].

    Every later stage reads class columns as probabilities; with this encoding their expected
    grade sum_c c * p_c is the predicted grade itself, so averaging folds, views and models
    averages grades, and the ensemble's thresholds cut the averaged grade.
    """
    grades = np.clip(np.asarray(grades, dtype=np.float64), 0, n_classes - 1)
    low = np.minimum(np.floor(grades).astype(np.int64), n_classes - 2)
    upper_share = grades - low
    probs = np.zeros((*grades.shape, n_classes))
    np.put_along_axis(probs, low[..., None], (1 - upper_share)[..., None], axis=-1)
    np.put_along_axis(probs, (low + 1)[..., None], upper_share[..., None], axis=-1)
    return probs


def apply_thresholds(grades: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Class = how many (sorted) thresholds the grade reaches."""
    return np.digitize(grades, np.sort(thresholds)).astype(np.int64)


def fit_thresholds(grades: np.ndarray, targets: np.ndarray, n_classes: int,
                   passes: int = 4, *, candidates: int = 48) -> np.ndarray:
    """Thresholds (C-1,) maximising QWK, by coordinate search from 0.5, 1.5, ...

    QWK is a step function of the thresholds, so instead of a gradient method each threshold in
    turn tries grid and quantile points between its neighbours (which keeps them sorted) and moves
    only when QWK strictly improves: the result never scores below the start.
    """
    thresholds = np.arange(n_classes - 1, dtype=np.float64) + 0.5
    best = quadratic_weighted_kappa(targets, apply_thresholds(grades, thresholds), n_classes)
    for _ in range(passes):
        improved = False
        for i in range(n_classes - 1):
            low = thresholds[i - 1] if i > 0 else 0.0
            high = thresholds[i + 1] if i < n_classes - 2 else float(n_classes - 1)
            inside = grades[(grades > low) & (grades < high)]
            points = np.linspace(low, high, candidates + 2)[1:-1]
            if len(inside):
                points = np.concatenate([points, np.quantile(inside, np.linspace(0, 1, candidates))])
            for point in np.unique(points):
                trial = thresholds.copy()
                trial[i] = point
                kappa = quadratic_weighted_kappa(targets, apply_thresholds(grades, trial), n_classes)
                if kappa > best + 1e-12:
                    best, thresholds, improved = kappa, trial, True
        if not improved:
            break
    return thresholds


def decoder_kind(data, setting: str, submission_kind: Callable[[], str]) -> str:
    """'thresholds', 'cutoff' or 'argmax' for `ensemble.decode` (auto: thresholds for an ordinal
    QWK label submission, a cut-off for a binary label submission scored by an F1 metric).

    `submission_kind()` gives the competition's (submission.resolved_submission_kind, which
    reads the sample), asked only when it matters: a fitted decoder makes labels, so a
    probability submission keeps argmax's probabilities."""
    if setting != "auto":
        return setting
    kind = Task.of(data).label_decoder  # the task owns which decoder fits the competition
    if kind is Decoder.ARGMAX or submission_kind() != "label":
        return Decoder.ARGMAX.value
    return kind.value


def decoded_score(kind: str, metric: str, targets: np.ndarray, probs: np.ndarray,
                  *, positive: int = 1) -> float:
    """The metric of `probs` as the submission will decode them, with the decoder fitted on these
    rows (in sample): never a reported CV, nor a fold's best epoch any more (that fitted on the
    rows it scored and kept undertrained epochs, issue 25: train.epoch_rule, cross_fitted_score)."""
    n_classes = probs.shape[1]
    if kind == "thresholds":
        grades = expected_grade(probs)
        labels = apply_thresholds(grades, fit_thresholds(grades, targets, n_classes, passes=2))
        return score_labels(metric, targets, labels, n_classes, positive=positive)
    if kind == "cutoff":
        cutoff = fit_cutoff(targets, probs[:, positive], metric, positive)
        return score_labels(metric, targets, labels_at_cutoff(probs, cutoff, positive), 2, positive=positive)
    raise ValueError(f"no decoder {kind!r}")


def cross_fitted_score(kind: str, metric: str, targets: np.ndarray, probs: np.ndarray,
                       *, positive: int = 1) -> float:
    """The metric of `probs` decoded by `kind`, fitted on one half of these rows and applied to
    the other, both ways round: never scored on the rows it was fitted on (EpochRule.CROSS_FIT,
    a fold's best epoch). The halves are stratified by target and fixed by the row order."""
    n_classes = probs.shape[1]
    halves = np.empty(len(targets), dtype=np.int64)
    halves[np.argsort(targets, kind="stable")] = np.arange(len(targets)) % 2
    if kind == Decoder.THRESHOLDS:
        grades = expected_grade(probs)
        labels = nested(lambda fit: fit_thresholds(grades[fit], targets[fit], n_classes, passes=2),
                        lambda fitted, held: apply_thresholds(grades[held], fitted),
                        halves, len(targets))
    elif kind == Decoder.CUTOFF:
        labels = nested(lambda fit: fit_cutoff(targets[fit], probs[fit, positive], metric, positive),
                        lambda fitted, held: labels_at_cutoff(probs[held], fitted, positive),
                        halves, len(targets))
    else:
        labels = probs.argmax(axis=1)
    return score_labels(metric, targets, labels, n_classes, positive=positive)


def nested(fit: Callable[[np.ndarray], object], apply: Callable[[object, np.ndarray], np.ndarray],
           row_folds: np.ndarray, n_rows: int) -> np.ndarray:
    """Out-of-fold application of anything fitted on rows: for each fold, `fit(rows of the other
    folds)` and `apply(fitted, rows of the fold)`; returns the assembled results in row order.

    `fit` and `apply` take boolean row masks, so the caller decides what a row holds (member
    probabilities, grades, targets).
    """
    out = None
    for fold in np.unique(row_folds):
        held = row_folds == fold
        result = np.asarray(apply(fit(~held), held))
        if out is None:
            out = np.empty((n_rows, *result.shape[1:]), dtype=result.dtype)
        out[held] = result
    return out


@dataclass
class Decoded:
    """Hard labels of a fitted decoder, with its in-sample and honest (nested) OOF scores."""

    kind: str  # "thresholds" or "cutoff"
    params: np.ndarray  # the thresholds (C-1,) or [cutoff], fitted on every OOF row
    oof_labels: np.ndarray  # (N_oof,) from `params`: the in-sample decoding
    nested_labels: np.ndarray  # (N_oof,) each fold decoded by params fitted on the others
    test_labels: np.ndarray  # (N_test,) from `params`
    score_argmax: float  # the metric of argmax (or the 0.5 cut-off) on the nested probabilities
    score_in_sample: float
    score_nested: float
    used: bool  # False: the nested score did not beat argmax; argmax labels are kept

    @property
    def thresholds(self) -> np.ndarray:
        return self.params


def decode_thresholds(oof: np.ndarray, test: np.ndarray, targets: np.ndarray,
                      row_folds: np.ndarray | None = None,
                      *, oof_nested: np.ndarray | None = None) -> Decoded:
    """Thresholds on the expected grade, fitted on every OOF row for the test set, and judged by
    their nested score (`row_folds`: each OOF row's fold; None: one fold, in-sample only).

    `oof_nested` is the OOF to score honestly (a fitted-weights ensemble's nested mix); None:
    `oof` itself.
    """
    n_classes = oof.shape[1]
    row_folds = np.zeros(len(oof), int) if row_folds is None else np.asarray(row_folds)
    oof_nested = oof if oof_nested is None else oof_nested
    thresholds = fit_thresholds(expected_grade(oof), targets, n_classes)
    in_sample = apply_thresholds(expected_grade(oof), thresholds)
    grades = expected_grade(oof_nested)
    if len(np.unique(row_folds)) > 1:
        honest = nested(lambda train: fit_thresholds(grades[train], targets[train], n_classes),
                        lambda fitted, held: apply_thresholds(grades[held], fitted),
                        row_folds, len(oof))
    else:
        honest = in_sample
    argmax = quadratic_weighted_kappa(targets, oof_nested.argmax(1), n_classes)
    score_in = quadratic_weighted_kappa(targets, in_sample, n_classes)
    score_honest = quadratic_weighted_kappa(targets, honest, n_classes)
    used = score_honest >= argmax if len(np.unique(row_folds)) > 1 else score_in >= argmax
    test_labels = (apply_thresholds(expected_grade(test), thresholds) if used
                   else test.argmax(1))
    return Decoded("thresholds", thresholds, in_sample if used else oof.argmax(1),
                   honest if used else oof_nested.argmax(1), test_labels, argmax, score_in,
                   score_honest, used)


def decode_cutoff(oof: np.ndarray, test: np.ndarray, targets: np.ndarray, metric: str,
                  *, positive: int, row_folds: np.ndarray | None = None,
                  oof_nested: np.ndarray | None = None) -> Decoded:
    """A cut-off on the positive class's probability (binary label submissions), fitted on every
    OOF row for the test set and judged by its nested score against the 0.5 cut-off."""
    if metric not in CUTOFF_METRICS:
        raise ValueError(f"no cut-off for {metric}")
    row_folds = np.zeros(len(oof), int) if row_folds is None else np.asarray(row_folds)
    oof_nested = oof if oof_nested is None else oof_nested
    cutoff = fit_cutoff(targets, oof[:, positive], metric, positive)
    in_sample = labels_at_cutoff(oof, cutoff, positive)
    if len(np.unique(row_folds)) > 1:
        honest = nested(lambda train: fit_cutoff(targets[train], oof_nested[train, positive],
                                                 metric, positive),
                        lambda fitted, held: labels_at_cutoff(oof_nested[held], fitted, positive),
                        row_folds, len(oof))
    else:  # one fold: nothing to nest in, so in sample (the report labels it)
        honest = labels_at_cutoff(oof_nested, cutoff, positive)
    plain = labels_at_cutoff(oof_nested, 0.5, positive)

    def of(labels):
        return score_labels(metric, targets, labels, 2, positive=positive)

    used = of(honest) >= of(plain)
    test_labels = labels_at_cutoff(test, cutoff if used else 0.5, positive)
    return Decoded("cutoff", np.array([cutoff]), in_sample if used else labels_at_cutoff(oof, 0.5, positive),
                   honest if used else plain, test_labels, of(plain), of(in_sample), of(honest),
                   used)
