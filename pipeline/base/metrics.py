"""Competition metrics on class probabilities, all from scikit-learn.

Every metric takes integer targets (N,) and probabilities (N, C), so training, out-of-fold
scoring and ensembling score the same way. `higher_is_better` says which way is up.

Binary competitions: `binary_f1` is the F1 of the positive class (column `positive`, 1 unless the
competition names another) at a cut-off, 0.5 in `score`; `fit_cutoff` picks the cut-off that
maximises an F1 on out-of-fold predictions and `score_at_cutoff` scores it.

A metric that cannot be computed on a split (ROC-AUC where fewer than two classes are present)
is NaN; `is_better` never prefers a NaN and always prefers a number to a NaN.
"""

from __future__ import annotations

import numpy as np

from pipeline.base.utils import warn

LOG_LOSS_EPS = 1e-15  # Kaggle's clipping: probabilities into [eps, 1 - eps], rows renormalised
CUTOFF_METRICS = ("binary_f1", "weighted_f1", "macro_f1", "accuracy")  # fit_cutoff can tune these


def predict_labels(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs).argmax(axis=1)


# scikit-learn is imported by the metrics that need it, when they score: it costs seconds at
# start-up, which `make runs` and `make status` of an accuracy competition need not pay


def _accuracy(targets, probs):
    return float(np.mean(np.asarray(targets) == predict_labels(probs)))


def _macro_f1(targets, probs):
    from sklearn.metrics import f1_score

    return f1_score(targets, predict_labels(probs), average="macro",
                    labels=np.arange(probs.shape[1]), zero_division=0)


def _weighted_f1(targets, probs):
    """F1 per class averaged with the class counts as weights (sklearn's average='weighted')."""
    from sklearn.metrics import f1_score

    return f1_score(targets, predict_labels(probs), average="weighted",
                    labels=np.arange(probs.shape[1]), zero_division=0)


def _binary_f1(targets, probs, positive: int = 1, cutoff: float = 0.5):
    """F1 of the positive class, predicted where its probability is >= cutoff."""
    if probs.shape[1] != 2:
        raise ValueError(f"binary_f1 needs two classes, got probabilities of {probs.shape[1]}")
    from sklearn.metrics import f1_score

    predicted = probs[:, positive] >= cutoff
    return f1_score(np.asarray(targets) == positive, predicted, zero_division=0)


def _qwk(targets, probs):
    from sklearn.metrics import cohen_kappa_score

    return cohen_kappa_score(targets, predict_labels(probs), weights="quadratic",
                             labels=np.arange(probs.shape[1]))


def _roc_auc(targets, probs):
    """ROC-AUC (one-vs-rest for several classes) over the classes present in `targets`.

    A small validation fold may lack a class: it is scored over the classes it has (with a
    warning) rather than failing. With fewer than two classes present AUC is undefined: NaN.
    """
    from sklearn.metrics import roc_auc_score

    present = np.unique(targets)
    n_classes = probs.shape[1]
    if len(present) < 2:
        warn(f"roc_auc is undefined on a split with only class(es) {present.tolist()}: NaN")
        return float("nan")
    if len(present) < n_classes:
        missing = sorted(set(range(n_classes)) - set(present.tolist()))
        warn(f"roc_auc scored over the {len(present)} classes present; class index(es) "
             f"{missing} have no row in this split")
    if len(present) == 2:  # binary, or two classes of several: the higher one's share of the two
        low, high = present
        share = probs[:, high] / np.maximum(probs[:, low] + probs[:, high], 1e-300)
        return roc_auc_score(np.asarray(targets) == high, share)
    kept = probs[:, present] / np.maximum(probs[:, present].sum(1, keepdims=True), 1e-300)
    return roc_auc_score(targets, kept, multi_class="ovr", labels=present)


def _log_loss(targets, probs):
    """Kaggle's multi-class log-loss: clip to [1e-15, 1 - 1e-15], renormalise rows, then the
    mean of -log p(true class). (sklearn no longer clips: a confident miss would be inf.)"""
    clipped = np.clip(probs, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    rows = np.arange(len(clipped))
    return float(-np.mean(np.log(clipped[rows, np.asarray(targets, dtype=np.int64)])))


METRIC_FUNCTIONS = {
    "accuracy": _accuracy,
    "macro_f1": _macro_f1,
    "weighted_f1": _weighted_f1,
    "binary_f1": _binary_f1,
    "qwk": _qwk,
    "roc_auc": _roc_auc,
    "log_loss": _log_loss,
}


def higher_is_better(metric: str) -> bool:
    return metric != "log_loss"


def score(metric: str, targets: np.ndarray, probs: np.ndarray, positive: int = 1) -> float:
    """The competition metric of probabilities `probs` (N, C) against `targets` (N,).

    `positive` is the positive class's column for binary_f1 (scoring.positive_index).
    """
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 +- 1e-7
    if metric == "binary_f1":
        return float(_binary_f1(np.asarray(targets), probs, positive))
    return float(METRIC_FUNCTIONS[metric](np.asarray(targets), probs))


def report_metrics(metric: str, targets: np.ndarray, probs: np.ndarray, ordinal: bool,
                   *, positive: int = 1) -> dict:
    """The competition metric first, then the usual companions (accuracy, macro-F1, QWK, log-loss).

    `positive`: the positive class's column, for binary_f1 (scoring.positive_index).
    """
    names = [metric] + [m for m in ("accuracy", "macro_f1", "log_loss") if m != metric]
    if ordinal and metric != "qwk":
        names.append("qwk")
    return {name: score(name, targets, probs, positive) for name in names}


def is_better(metric: str, new: float, best: float | None) -> bool:
    """Whether `new` improves on `best`. NaN (an undefined score) is never better than anything,
    and any number is better than a NaN or no best yet: a run whose first epochs score NaN keeps
    the first defined score, and NaN never replaces a real one."""
    if new is None or np.isnan(new):
        return False
    if best is None or np.isnan(best):
        return True
    return new > best if higher_is_better(metric) else new < best


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Class indices (N,) -> (N, C) one-hot rows, so hard labels score through `score`."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros((len(labels), n_classes), dtype=np.float64)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def score_labels(metric: str, targets: np.ndarray, labels: np.ndarray, n_classes: int,
                 *, positive: int = 1) -> float:
    """The metric of hard labels (N,), e.g. after threshold decoding (as one-hot probabilities)."""
    return score(metric, targets, one_hot(labels, n_classes), positive)


def quadratic_weighted_kappa(targets: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """QWK from the confusion matrix with bincount: equal to sklearn's, ~100x faster, for searches
    that score thousands of candidate thresholds. 0.0 where kappa is undefined (one class only)."""
    targets, labels = np.asarray(targets, np.int64), np.asarray(labels, np.int64)
    observed = np.bincount(targets * n_classes + labels,
                           minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1)
    grid = np.arange(n_classes)
    weights = (grid[:, None] - grid[None, :]) ** 2
    chance = (weights * expected).sum()
    return float(1.0 - (weights * observed).sum() / chance) if chance > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Binary cut-offs


def _binary_scores(truth: np.ndarray, predicted: np.ndarray, metric: str) -> np.ndarray:
    """`metric` of binary predictions (K, N) against truth (N,) for K cut-offs at once, from the
    confusion counts (sklearn per cut-off would cost ~100x more). zero_division is 0, as in
    sklearn's f1_score(zero_division=0)."""
    tp = (predicted & truth).sum(axis=1).astype(np.float64)
    fp = (predicted & ~truth).sum(axis=1).astype(np.float64)
    fn = (~predicted & truth).sum(axis=1).astype(np.float64)
    tn = len(truth) - tp - fp - fn
    if metric == "accuracy":
        return (tp + tn) / max(len(truth), 1)

    def f1(hits, misses):
        denominator = 2 * hits + misses
        return np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0)

    f1_positive, f1_negative = f1(tp, fp + fn), f1(tn, fp + fn)
    if metric == "binary_f1":
        return f1_positive
    if metric == "macro_f1":
        return (f1_positive + f1_negative) / 2
    n_positive = truth.sum()
    return (f1_positive * n_positive + f1_negative * (len(truth) - n_positive)) / max(len(truth), 1)


def cutoff_candidates(positive_probs: np.ndarray, points: int = 101) -> np.ndarray:
    """Where a cut-off is worth trying: the unique quantiles (0, 1, ..., 100 %) of the positive
    probabilities, and 0.5, so the fitted cut-off is never worse in sample than the default."""
    quantiles = np.quantile(np.asarray(positive_probs, dtype=np.float64), np.linspace(0, 1, points))
    return np.unique(np.append(quantiles, 0.5))


def fit_cutoff(targets: np.ndarray, positive_probs: np.ndarray, metric: str,
               positive: int = 1) -> float:
    """The cut-off on the positive class's probability (predict positive where p >= cut-off)
    that maximises `metric` (binary_f1, or weighted_f1 / macro_f1 / accuracy of a binary problem).

    `targets` are class indices (N,), `positive_probs` (N,) the positive class's probabilities.
    Ties go to the cut-off nearest 0.5. Fitted on out-of-fold predictions, it must be scored on
    rows it was not fitted on (README.md, "Honest scores").
    """
    if metric not in CUTOFF_METRICS:
        raise ValueError(f"a cut-off is fitted for {CUTOFF_METRICS}, not {metric!r} (ROC-AUC and "
                         f"log-loss score probabilities, not labels)")
    probs = np.asarray(positive_probs, dtype=np.float64)
    truth = np.asarray(targets) == positive
    if len(probs) != len(truth) or len(probs) == 0:
        raise ValueError(f"{len(truth)} targets but {len(probs)} probabilities")
    candidates = cutoff_candidates(probs)
    scores = _binary_scores(truth, probs[None, :] >= candidates[:, None], metric)
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def labels_at_cutoff(probs: np.ndarray, cutoff: float, positive: int = 1) -> np.ndarray:
    """Class indices (N,) of binary probabilities (N, 2): `positive` where p >= cutoff."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != 2:
        raise ValueError(f"a cut-off needs binary probabilities (N, 2), got shape {probs.shape}")
    return np.where(probs[:, positive] >= cutoff, positive, 1 - positive)


def score_at_cutoff(metric: str, targets: np.ndarray, probs: np.ndarray, cutoff: float,
                    *, positive: int = 1) -> float:
    """`metric` of the labels that `cutoff` makes of binary probabilities (N, 2)."""
    return score_labels(metric, targets, labels_at_cutoff(probs, cutoff, positive), 2, positive=positive)
