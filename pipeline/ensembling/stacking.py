"""Ensembles fitted on out-of-fold predictions beyond one weight per member: greedy selection
(hill climbing) and level-2 stackers. Pure functions of arrays; pipeline/ensembling/combine.py scores them
nested and chooses between methods.

    weights = hillclimb(oof_stack, targets, scorer)             # (M,), counts / rounds
    stacker = fit_stacker("logreg", oof_stack, targets)          # a JSON-able dict
    probs = apply_stacker(stacker, test_stack)                   # (N, C), also what `infer` runs

Hill climbing (Caruana et al. 2004, "Ensemble selection from libraries of models"; AutoGluon's
WeightedEnsemble): start from the best member, then in each of `rounds` rounds add, with
replacement, the member whose addition most improves the competition metric of the averaged
probabilities, and keep the best prefix of the picks (the shortest reaching the best score). The
weights are how often each member was picked. Picking with replacement lets a strong member
weigh more without a weight per member to overfit; ties go to a member already picked, so the
ensemble stays as small as the metric allows. The metric is that of the averaged probabilities
(argmax, or the 0.5 cut-off): a decoder (thresholds, a cut-off) is fitted afterwards, nested, on
what the selection made; fitting one inside every trial would cost a threshold search each.

Stackers (BloodAxe's APTOS 2019 ensembling) are scikit-learn estimators fitted on the members'
OOF predictions:
  logreg  multinomial logistic regression on every member's log-probabilities (M*C features)
  ridge   ordinal competitions: ridge regression of the grade on each member's expected grade
          (M features); the predicted grade becomes a two-point distribution
          (decode.grade_to_probs), so the thresholds decoder cuts it as it cuts any grade.
The fitted parameters are stored as plain numbers and applied with numpy here, so the offline
`infer` needs no pickled estimator.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression, Ridge

from pipeline.base.task import Scorer
from pipeline.ensembling.decode import expected_grade, grade_to_probs

STACKERS = ("logreg", "ridge")
LOG_FLOOR = 1e-6  # probabilities are floored before the log: a 0 would be an infinite feature
PATIENCE = 5  # hill climbing stops after this many picks in a row that did not improve
# sklearn's defaults, not tuned (bench/ensembles.py measures the stacker as it is): logreg's C is
# the inverse of its L2 strength, ridge's alpha the strength itself
LOGREG_C, RIDGE_ALPHA = 1.0, 1.0
STACKER_SOLVER = "newton-cg"
# logreg has C x (M*C) coefficients, stored in the submission's manifest; above this many the
# stacker is refused (and auto leaves it out): hillclimb or fitted weights scale to any C
MAX_COEFFICIENTS = 200_000


def hillclimb(oof_stack: np.ndarray, targets: np.ndarray, scorer: Scorer,
              rounds: int) -> np.ndarray:
    """Weights (M,) summing to 1: how often each member was picked by greedy selection with
    replacement, starting from the best single member. A pick that scores no better is still
    made (on step metrics like accuracy and QWK a later one may improve), until `rounds` picks
    or PATIENCE picks in a row without a better score; the best prefix is kept: the shortest
    one reaching the best score."""
    members = len(oof_stack)
    counts = np.zeros(members, np.int64)
    scores = [scorer.score(targets, p) for p in oof_stack]
    first = _best_index(scores, scorer, counts)
    counts[first], total = 1, oof_stack[first].copy()
    best_score, best_counts, since_best = scores[first], counts.copy(), 0
    for _ in range(rounds - 1 if members > 1 else 0):
        if since_best >= PATIENCE:
            break
        picks = counts.sum()
        trials = [scorer.score(targets, (total + oof_stack[m]) / (picks + 1))
                  for m in range(members)]
        chosen = _best_index(trials, scorer, counts)
        counts[chosen] += 1
        total += oof_stack[chosen]
        since_best += 1
        if scorer.is_better(trials[chosen], best_score):
            best_score, best_counts, since_best = trials[chosen], counts.copy(), 0
    return best_counts / best_counts.sum()


def _best_index(scores: list[float], scorer: Scorer, counts: np.ndarray) -> int:
    """The best score's index; among equal scores a member already picked, then the first."""
    best = 0
    for index in range(1, len(scores)):
        if scorer.is_better(scores[index], scores[best]):
            best = index
        elif scores[index] == scores[best] and counts[index] > 0 and counts[best] == 0:
            best = index
    return best


def coefficients(kind: str, members: int, classes: int) -> int:
    """How many numbers the stacker `kind` fits (and the manifest stores)."""
    return members + 1 if kind == "ridge" else classes * (members * classes + 1)


def stacker_features(kind: str, stack: np.ndarray) -> np.ndarray:
    """Members' predictions (M, N, C) -> the stacker's inputs: (N, M*C) log-probabilities for
    logreg, (N, M) expected grades for ridge."""
    if kind == "ridge":
        return np.stack([expected_grade(p) for p in stack], axis=1)
    members, rows, classes = stack.shape
    logs = np.log(np.clip(stack, LOG_FLOOR, 1.0))
    return logs.transpose(1, 0, 2).reshape(rows, members * classes)


def fit_stacker(kind: str, oof_stack: np.ndarray, targets: np.ndarray) -> dict:
    """The stacker `kind` fitted on OOF predictions (M, N, C): its parameters as a JSON-able
    dict that `apply_stacker` reads."""
    features, n_classes = stacker_features(kind, oof_stack), oof_stack.shape[2]
    if kind == "ridge":
        model = Ridge(alpha=RIDGE_ALPHA).fit(features, targets.astype(np.float64))
        return {"kind": kind, "classes": n_classes, "coef": model.coef_.tolist(),
                "intercept": float(model.intercept_)}
    if kind != "logreg":
        raise ValueError(f"unknown stacker {kind!r}; one of {', '.join(STACKERS)}")
    present = np.unique(targets)
    if len(present) == 1:  # nothing to learn: that one class, always
        coef, intercept = np.zeros((1, features.shape[1])), np.zeros(1)
    else:
        # newton-cg, not lbfgs: on peaked members' log-probabilities lbfgs ran into its
        # iteration cap (1,944 iterations, 16.8 s on 10,000 rows) where newton-cg converges in 17
        # (0.7 s); auto fits the stacker dozens of times
        model = LogisticRegression(C=LOGREG_C, max_iter=2000, solver=STACKER_SOLVER).fit(
            features, targets)
        coef, intercept = model.coef_, model.intercept_
    return {"kind": kind, "classes": n_classes, "present": present.tolist(),
            "coef": coef.tolist(), "intercept": intercept.tolist()}


def apply_stacker(stacker: dict, stack: np.ndarray) -> np.ndarray:
    """(M, N, C) member predictions -> (N, C) probabilities by a fitted stacker's parameters."""
    features = stacker_features(stacker["kind"], stack)
    n_classes = int(stacker["classes"])
    if stacker["kind"] == "ridge":
        grades = features @ np.asarray(stacker["coef"]) + stacker["intercept"]
        return grade_to_probs(grades, n_classes)
    present = np.asarray(stacker["present"], np.int64)
    logits = features @ np.asarray(stacker["coef"]).T + np.asarray(stacker["intercept"])
    if len(present) == 2:  # sklearn's binary model: one logit, for the second class
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    probs = np.zeros((len(features), n_classes))
    probs[:, present] = softmax(logits, axis=1) if len(present) > 1 else 1.0
    return probs
