"""Ensemble maths as pure functions of arrays: combining members, fitted weights, nested
scores, decoding, and an experiment's fold mean with its refit.

    test = fold_mean_with_refit(fold_tests, refit_test, weight)     # one experiment's test rows
    combined = combine_members(oof_stack, test_stack, targets, "fitted", scorer, row_folds)
    decoded = decode_combined("thresholds", combined, targets, row_folds, scorer)

`make ensemble` (pipeline/ensemble.py), `make pseudo` and the offline `infer` all call these, so
a submission, its pseudo-labels and its offline reproduction are made by the same code.

Methods (`ensemble.method`), over members' (M, N, C) probabilities:
  mean     the plain average
  median   the per-cell median, rows renormalised
  trimmed  scipy's trim_mean cutting 20% at each end (the mean below 3 members), rows renormalised
  rank     the average of per-class rank-normalised probabilities: for ROC-AUC, where only the
           order matters and members are calibrated differently. Outputs are scores, not
           probabilities; rows are renormalised to be scored and submitted.
  fitted   non-negative weights summing to 1 (softmax-parametrised), fitted on the OOF predictions
           by minimising log-loss (the smooth proxy of every metric here; accuracy and QWK are
           step functions an optimiser cannot follow), starting from equal weights. They are
           scored nested (each fold mixed by weights fitted on the other folds) and used only
           when that beats equal weights.
Whatever is fitted on OOF rows is scored out of fold (README.md, "Honest scores").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax
from scipy.stats import rankdata, trim_mean

from pipeline.decode import (Decoded, apply_thresholds, decode_cutoff, decode_thresholds,
                             expected_grade, nested)
from pipeline.metrics import labels_at_cutoff
from pipeline.scoring import Scorer

TRIM_FRACTION = 0.2  # trimmed mean: cut this share of the members at each end


@dataclass
class Combined:
    """The ensemble's predictions and how they were made."""

    oof: np.ndarray  # (N_oof, C), rows sum to 1; fitted weights: fitted on these very rows
    test: np.ndarray  # (N_test, C), rows sum to 1
    weights: np.ndarray | None  # per member; None for median/trimmed (not a weighted average)
    notes: list[str] = field(default_factory=list)
    # (N_oof, C): each fold mixed by weights fitted on the other folds (the honest OOF); the same
    # as `oof` when nothing is fitted
    oof_nested: np.ndarray | None = None


def fold_mean_with_refit(fold_tests: Sequence[np.ndarray], refit_test: np.ndarray | None,
                         refit_weight: float) -> np.ndarray:
    """One experiment's test rows: its folds' mean, with the full-data refit joined at
    `refit_weight` (the folds together weigh 1): (mean + w * refit) / (1 + w)."""
    test = np.mean(fold_tests, axis=0)
    if refit_test is not None and refit_weight > 0:
        test = (test + refit_weight * refit_test) / (1.0 + refit_weight)
    return test


def normalise_rows(scores: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (a row of zeros becomes uniform)."""
    totals = scores.sum(axis=1, keepdims=True)
    uniform = np.full_like(scores, 1.0 / scores.shape[1])
    return np.divide(scores, totals, out=uniform, where=totals > 0)


def rank_normalise(probs: np.ndarray) -> np.ndarray:
    """Each class column (N,) -> its ranks / N in (0, 1]; ties share their average rank."""
    return rankdata(probs, axis=0, method="average") / len(probs)


def combine(stack: np.ndarray, method: str, weights: np.ndarray | None = None) -> np.ndarray:
    """(M, N, C) member predictions -> (N, C), rows summing to 1.

    `weights` (M,) apply to mean and fitted (equal when None); rank averages rank-normalised
    members (scores, renormalised per row).
    """
    members = len(stack)
    if weights is None:
        weights = np.full(members, 1.0 / members)
    if method in ("mean", "fitted"):
        out = np.tensordot(weights, stack, axes=1)
    elif method == "median":
        out = np.median(stack, axis=0)
    elif method == "trimmed":
        out = trim_mean(stack, TRIM_FRACTION, axis=0) if members >= 3 else stack.mean(axis=0)
    elif method == "rank":
        out = np.tensordot(weights, np.stack([rank_normalise(p) for p in stack]), axes=1)
    else:
        raise ValueError(f"unknown ensemble method {method!r}")
    return normalise_rows(out)


def _log_loss_of_true(true_probs: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """Log-loss of the weighted mix and its gradient in the weights.

    true_probs (M, N): each member's probability of the true class, p_m[i, y_i].
    """
    mix = np.clip(weights @ true_probs, 1e-15, None)
    loss = -np.log(mix).mean()
    grad = -(true_probs / mix).mean(axis=1)
    return float(loss), grad


def fit_weights(oof_stack: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 minimising OOF log-loss, from equal weights.

    Weights = softmax(z) keeps them on the simplex without constraints; the analytic gradient
    through the softmax (w * (g - w.g)) makes L-BFGS converge in a few dozen steps.
    """
    members = len(oof_stack)
    if members == 1:
        return np.ones(1)
    true_probs = oof_stack[:, np.arange(len(targets)), targets]  # (M, N)

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        weights = softmax(z)
        loss, grad = _log_loss_of_true(true_probs, weights)
        return loss, weights * (grad - weights @ grad)

    result = minimize(objective, np.zeros(members), jac=True, method="L-BFGS-B")
    return softmax(result.x)


def nested_fitted_mix(oof_stack: np.ndarray, targets: np.ndarray,
                      row_folds: np.ndarray) -> np.ndarray:
    """The fitted-weights mix of each fold's OOF rows with weights fitted on the other folds."""
    return nested(lambda train: fit_weights(oof_stack[:, train], targets[train]),
                  lambda weights, held: combine(oof_stack[:, held], "fitted", weights),
                  row_folds, oof_stack.shape[1])


def _fitted_or_equal(oof_stack: np.ndarray, targets: np.ndarray, scorer: Scorer,
                     row_folds: np.ndarray | None,
                     notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(weights, nested OOF mix): fitted weights when their honest score is not worse than equal
    weights', else equal weights and None."""
    fitted = fit_weights(oof_stack, targets)
    nested_folds = row_folds is not None and len(np.unique(row_folds)) > 1
    honest = (nested_fitted_mix(oof_stack, targets, row_folds) if nested_folds
              else combine(oof_stack, "fitted", fitted))
    equal_score = scorer.score(targets, combine(oof_stack, "mean"))
    fitted_score = scorer.score(targets, honest)
    if scorer.is_better(equal_score, fitted_score):
        how = "out of fold (nested)" if row_folds is not None else "in sample"
        notes.append(f"fitted weights scored {scorer.metric} {fitted_score:.4f} {how}, worse "
                     f"than equal weights ({equal_score:.4f}): equal weights used")
        return np.full(len(oof_stack), 1.0 / len(oof_stack)), None
    return fitted, honest


def combine_members(oof_stack: np.ndarray, test_stack: np.ndarray, targets: np.ndarray,
                    method: str, scorer: Scorer,
                    row_folds: np.ndarray | None = None) -> Combined:
    """The ensemble of OOF and test predictions by `method`.

    Fitted weights are fitted on every OOF row for the test set; with `row_folds` (each OOF row's
    fold) they are also scored honestly, each fold mixed by weights fitted on the others, and
    kept only when that nested score beats equal weights.
    """
    members = len(oof_stack)
    notes: list[str] = []
    weights: np.ndarray | None = np.full(members, 1.0 / members)
    oof_nested = None
    if method == "fitted":
        weights, oof_nested = _fitted_or_equal(oof_stack, targets, scorer, row_folds, notes)
    elif method == "trimmed" and members < 3:
        notes.append(f"trimmed mean needs 3 members, {members} given: plain mean used")
    elif method in ("median", "trimmed"):
        weights = None  # not a weighted average
    elif method == "rank":
        notes.append("rank outputs are scores, not probabilities; rows renormalised to be scored "
                     "and submitted")
        if scorer.metric != "roc_auc":
            notes.append(f"rank averaging suits ROC-AUC; the metric is {scorer.metric}")
    oof = combine(oof_stack, method, weights)
    return Combined(oof=oof, test=combine(test_stack, method, weights), weights=weights,
                    notes=notes, oof_nested=oof if oof_nested is None else oof_nested)


def decode_combined(kind: str, combined: Combined, targets: np.ndarray, row_folds: np.ndarray,
                    scorer: Scorer) -> Decoded | None:
    """The fitted decoder `kind` (thresholds, cutoff; argmax: None) of an ensemble, judged by its
    nested score; a note says so when it did not beat argmax."""
    if kind == "thresholds":
        decoded = decode_thresholds(combined.oof, combined.test, targets, row_folds,
                                    combined.oof_nested)
    elif kind == "cutoff":
        decoded = decode_cutoff(combined.oof, combined.test, targets, scorer.metric,
                                scorer.positive, row_folds, combined.oof_nested)
    else:
        return None
    what = "thresholds" if kind == "thresholds" else f"a cut-off of {decoded.params[0]:.3f}"
    if not decoded.used:
        combined.notes.append(
            f"{what} scored {scorer.metric} {decoded.score_nested:.4f} out of fold (each fold "
            f"decoded by a fit on the others), not above argmax's {decoded.score_argmax:.4f}: "
            f"argmax used")
    return decoded


def honest_scores(targets: np.ndarray, combined: Combined, decoded: Decoded | None,
                  scorer: Scorer) -> dict[str, float]:
    """{'out of fold': the honest CV, 'in sample': the figure fitted on the rows it scores}.

    The honest CV scores each fold with whatever was fitted (weights, thresholds, cut-off) on the
    other folds only; it is the number in the submission's name.
    """
    if decoded is not None and decoded.used:
        return {"out of fold": decoded.score_nested, "in sample": decoded.score_in_sample}
    return {"out of fold": scorer.score(targets, combined.oof_nested),
            "in sample": scorer.score(targets, combined.oof)}


def apply_decoding(decoding: dict, probs: np.ndarray) -> np.ndarray:
    """What a submission holds from ensemble probabilities, by a recorded decoding
    ({"kind": argmax|thresholds|cutoff, "thresholds": [...], "cutoff": c, "positive": k}):
    class indices (N,) of a fitted decoder, else the probabilities themselves."""
    if decoding["kind"] == "thresholds":
        return apply_thresholds(expected_grade(probs), np.asarray(decoding["thresholds"]))
    if decoding["kind"] == "cutoff":
        return labels_at_cutoff(probs, float(decoding["cutoff"]), int(decoding["positive"]))
    return probs
