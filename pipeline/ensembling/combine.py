"""Ensemble maths as pure functions of arrays: combining members, fitted weights, nested
scores, decoding, and an experiment's fold mean with its refit.

    test = fold_mean_with_refit(fold_tests, refit_test, weight)     # one experiment's test rows
    combined = combine_members(oof_stack, test_stack, targets, "fitted", scorer, row_folds)
    decoded = decode_combined("thresholds", combined, targets, row_folds, scorer)

`make ensemble` (pipeline/stages/ensemble.py), `make pseudo` and the offline `infer` all call these, so
a submission, its pseudo-labels and its offline reproduction are made by the same code.

Methods (`ensemble.method`), over members' (M, N, C) probabilities:
  mean     the plain average
  median   the per-cell median, rows renormalised
  trimmed  scipy's trim_mean cutting 20% at each end (the mean below 3 members), rows renormalised
  rank     the average of per-class ranks: for ROC-AUC, where only the order matters and
           members are calibrated differently. A value's rank is its quantile among that
           member's OOF values of that class (rank_reference), a fixed reference: ranking the
           rows passed together made a row's output depend on the other rows (a 10-row fold
           scored 0.60 where the 30 OOF rows scored 0.33, and `infer` labelled one image
           differently by the ids beside it). Outputs are scores, not probabilities; rows are
           renormalised to be scored and submitted. auto tries it for ROC-AUC only.
  fitted   non-negative weights summing to 1 (softmax-parametrised), fitted on the OOF predictions
           by minimising log-loss (the smooth proxy of every metric here; accuracy and QWK are
           step functions an optimiser cannot follow), starting from equal weights. They are
           scored nested (each fold mixed by weights fitted on the other folds) and used only
           when that beats equal weights.
  hillclimb  greedy selection with replacement (Caruana et al. 2004): the weights are how often
           each member was picked (pipeline/ensembling/stacking.py)
  stack    a level-2 scikit-learn model on the members' OOF predictions (`ensemble.stacker`:
           logreg on log-probabilities, ridge on expected grades for ordinal competitions)
  auto     every method above scored nested (rank for ROC-AUC only), the best used; its CV
           nests the choice too: each held fold goes through the whole of auto done on the
           other folds alone (choice, fit, decoder: auto_nested); the folds' spread is noted
Whatever is fitted on OOF rows is scored out of fold (README.md, "Honest scores").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax
from scipy.stats import trim_mean
from tqdm import tqdm

from pipeline.base.config import EnsembleConfig
from pipeline.base.metrics import labels_at_cutoff
from pipeline.base.task import Scorer
from pipeline.base.utils import PipelineError
from pipeline.ensembling.decode import (
    Decoded,
    apply_thresholds,
    decode_cutoff,
    decode_thresholds,
    decoded_score,
    expected_grade,
    nested,
)
from pipeline.ensembling.stacking import (
    MAX_COEFFICIENTS,
    apply_stacker,
    coefficients,
    fit_stacker,
    hillclimb,
)

TRIM_FRACTION = 0.2  # trimmed mean: cut this share of the members at each end
# rank: each member's OOF values of each class kept as this many quantiles (0%, 1%, ..., 100%),
# stored in the submission's manifest; values between them are interpolated
RANK_QUANTILES = 101
FITTED_METHODS = ("fitted", "hillclimb", "stack")  # fitted on OOF rows, so scored nested
# What a `both` member submits from (choose_views): its class probabilities, or its grade
# output as two-point distributions between neighbouring grades
PROBS_VIEW, GRADE_VIEW = "class probabilities", "grade output"


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
    fit: Fit | None = None  # what combines the test rows (and, offline, `infer`'s)
    table: list[MethodScore] = field(default_factory=list)  # auto: every method, scored
    fitted: bool = False  # something was fitted on the OOF rows (weights, selection, stacker)
    nested: bool = False  # and `oof_nested` holds each fold combined by a fit on the others
    choice_nested: bool = False  # auto: the choice of method was made on the other folds too
    # auto with the choice nested: each held fold as the whole of auto made on the other folds
    # submits it (method chosen, fitted and decoded there): its labels under a fitted decoder,
    # else None (argmax of `oof_nested`); what its CV scores (auto_nested)
    nested_labels: np.ndarray | None = None
    fold_scores: list[float] = field(default_factory=list)  # that CV on each held fold alone

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


def rank_reference(oof_stack: np.ndarray) -> dict:
    """What `rank` ranks against: each member's OOF values of each class as RANK_QUANTILES
    quantiles, {"kind": "rank", "quantiles": (M, Q, C)}, JSON-able (it travels in the
    manifest's `stacker` slot, the fitted parameters beyond weights, to `infer`)."""
    levels = np.linspace(0.0, 1.0, min(RANK_QUANTILES, oof_stack.shape[1]))
    quantiles = np.quantile(oof_stack, levels, axis=1).transpose(1, 0, 2)  # (M, Q, C)
    return {"kind": "rank", "quantiles": quantiles.tolist()}


def rank_against(quantiles: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(N, C) values -> their quantile in [0, 1] among a reference (Q, C), class by class: each
    row on its own, whatever rows come with it. A value equal to several quantiles (ties)
    takes their middle, as scikit-learn's QuantileTransformer does (the mean of interpolating
    up and down); beyond the reference it is 0 or 1."""
    levels = np.linspace(0.0, 1.0, len(quantiles))
    out = np.empty_like(probs, dtype=np.float64)
    for c in range(probs.shape[1]):
        up = np.interp(probs[:, c], quantiles[:, c], levels)
        down = -np.interp(-probs[:, c], -quantiles[::-1, c], -levels[::-1])
        out[:, c] = 0.5 * (up + down)
    return out


def combine(stack: np.ndarray, method: str, weights: np.ndarray | None = None,
            reference: dict | None = None) -> np.ndarray:
    """(M, N, C) member predictions -> (N, C), rows summing to 1.

    `weights` (M,) apply to mean and fitted (equal when None); rank averages the members'
    ranks against `reference` (rank_reference of OOF rows; scores, renormalised per row).
    """
    members = len(stack)
    if weights is None:
        weights = np.full(members, 1.0 / members)
    if method in ("mean", "fitted", "hillclimb"):
        out = np.tensordot(weights, stack, axes=1)
    elif method == "median":
        out = np.median(stack, axis=0)
    elif method == "trimmed":
        out = trim_mean(stack, TRIM_FRACTION, axis=0) if members >= 3 else stack.mean(axis=0)
    elif method == "rank":
        if reference is None:
            raise PipelineError("this rank ensemble was recorded without the OOF reference its "
                                "ranks are taken against (made before that fix): run `make "
                                "ensemble` again (and `make bundle` for offline inference)")
        quantiles = np.asarray(reference["quantiles"])
        out = np.tensordot(weights, np.stack([rank_against(q, p)
                                              for q, p in zip(quantiles, stack)]), axes=1)
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


def _fitted_or_equal(oof_stack: np.ndarray, targets: np.ndarray, scorer: Scorer,
                     row_folds: np.ndarray | None,
                     *, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(weights, their nested OOF mix or None when there is one fold, whether they are the
    fitted ones): fitted weights when their honest score is not worse than equal weights',
    else equal weights."""
    fitted = fit_weights(oof_stack, targets)
    honest = fitted_nested("fitted", oof_stack, targets, row_folds, scorer=scorer, options=Options())
    judged = combine(oof_stack, "fitted", fitted) if honest is None else honest
    equal_score = scorer.score(targets, combine(oof_stack, "mean"))
    fitted_score = scorer.score(targets, judged)
    if scorer.is_better(equal_score, fitted_score):
        how = "in sample" if honest is None else "out of fold (nested)"
        notes.append(f"fitted weights scored {scorer.metric} {fitted_score:.4f} {how}, worse "
                     f"than equal weights ({equal_score:.4f}): equal weights used")
        return np.full(len(oof_stack), 1.0 / len(oof_stack)), None, False
    return fitted, honest, True


# --------------------------------------------------------------------------------------------
# Every method as a fit (on OOF rows) and its application (to any rows)


@dataclass(frozen=True)
class Options:
    """The `ensemble:` settings the fitted methods read."""

    stacker: str = EnsembleConfig().stacker  # stack: logreg | ridge (stacking.STACKERS)
    rounds: int = EnsembleConfig().hillclimb_rounds  # hillclimb: this many picks
    ordinal: bool = False  # auto also tries the ridge stacker on expected grades
    # the submission's decoder (decode.decoder_kind): auto scores each method as decoded by it
    decode: str = "argmax"

    @classmethod
    def of(cls, settings: EnsembleConfig, ordinal: bool, decode: str = "argmax") -> Options:
        return cls(settings.stacker, settings.hillclimb_rounds, ordinal, decode)


@dataclass
class Fit:
    """A method fitted on OOF rows: what it applies to members' predictions (M, N, C)."""

    method: str
    weights: np.ndarray | None  # mean, rank, fitted, hillclimb; None: median, trimmed, stack
    # the fitted parameters beyond weights, JSON-able (the manifest's `stacker`): stack's model
    # (stacking.fit_stacker), rank's reference quantiles (rank_reference, fitted on no label)
    stacker: dict | None = None

    def apply(self, stack: np.ndarray) -> np.ndarray:
        return apply_combination(self.method, self.weights, self.stacker, stack)

    @property
    def label(self) -> str:
        return f"stack ({self.stacker['kind']})" if self.method == "stack" else self.method


def apply_combination(method: str, weights, stacker: dict | None,
                      stack: np.ndarray) -> np.ndarray:
    """(M, N, C) -> (N, C) as a recorded ensemble (method, weights, stacker) combines: what the
    submission's test rows and the offline `infer` compute."""
    if method == "stack":
        return apply_stacker(stacker, stack)
    return combine(stack, method, None if weights is None else np.asarray(weights), stacker)


def check_stacker(kind: str, members: int, classes: int) -> None:
    """Refuse a stacker too large to fit and store (stacking.MAX_COEFFICIENTS)."""
    count = coefficients(kind, members, classes)
    if count > MAX_COEFFICIENTS:
        raise PipelineError(f"the {kind} stacker of {members} members x {classes} classes fits "
                         f"{count:,} coefficients (at most {MAX_COEFFICIENTS:,}); use "
                         f"ensemble.method=hillclimb or fitted, which fit one weight per member")


def fit_method(method: str, oof_stack: np.ndarray, targets: np.ndarray, scorer: Scorer,
               *, options: Options) -> Fit:
    """`method` fitted on these OOF rows (nothing to fit: equal weights, or none)."""
    members = len(oof_stack)
    if method == "fitted":
        return Fit(method, fit_weights(oof_stack, targets))
    if method == "hillclimb":
        return Fit(method, hillclimb(oof_stack, targets, scorer, options.rounds))
    if method == "stack":
        check_stacker(options.stacker, members, oof_stack.shape[2])
        return Fit(method, None, fit_stacker(options.stacker, oof_stack, targets))
    if method in ("median", "trimmed") and not (method == "trimmed" and members < 3):
        return Fit(method, None)
    if method == "rank":  # its reference: the OOF values, no label (nothing to nest)
        return Fit(method, np.full(members, 1.0 / members), rank_reference(oof_stack))
    return Fit(method, np.full(members, 1.0 / members))


def fold_count(row_folds: np.ndarray | None) -> int:
    return 0 if row_folds is None else len(np.unique(row_folds))


def fitted_nested(method: str, oof_stack: np.ndarray, targets: np.ndarray,
                  row_folds: np.ndarray | None, *, scorer: Scorer,
                  options: Options) -> np.ndarray | None:
    """(N, C): each fold combined by `method` fitted on the other folds (the honest OOF); None
    when there is nothing to nest: a method that fits nothing, or fewer than two folds."""
    if method not in FITTED_METHODS or fold_count(row_folds) < 2:
        return None
    return nested(lambda train: fit_method(method, oof_stack[:, train], targets[train], scorer,
                                           options=options),
                  lambda fit, held: fit.apply(oof_stack[:, held]),
                  row_folds, oof_stack.shape[1])


# --------------------------------------------------------------------------------------------
# auto: every method scored nested, the best used; the choice itself nested for the CV


@dataclass
class MethodScore:
    """One method of `auto`'s table, fitted on every OOF row and scored both ways."""

    fit: Fit
    honest: np.ndarray  # (N, C): fitted on the other folds for each held one (in sample: same)
    score_nested: float  # the metric of `honest`
    score_in_sample: float  # fitted on the rows it scores


def auto_candidates(options: Options, shape: tuple[int, ...], row_folds: np.ndarray | None,
                    metric: str) -> list[tuple[str, Options]]:
    """The methods `auto` tries, simplest first (a tie goes to the simpler one): with fewer than
    two folds only those that fit nothing (the others could be judged in sample only); rank only
    where the metric only ranks (ROC-AUC: elsewhere its per-class ranks, renormalised, are no
    probabilities, and on one member it only adds a chance to win the choice by noise); a
    stacker too large to store is left out."""
    members, _, classes = shape
    simple = ("mean", "median", "trimmed", "rank") if metric == "roc_auc" else (
        "mean", "median", "trimmed")
    candidates = [(m, options) for m in simple]
    if fold_count(row_folds) < 2:
        return candidates
    candidates += [(m, options) for m in ("fitted", "hillclimb")]
    stackers = ("logreg", "ridge") if options.ordinal else ("logreg",)
    return candidates + [("stack", replace(options, stacker=s)) for s in stackers
                         if coefficients(s, members, classes) <= MAX_COEFFICIENTS]


def score_methods(oof_stack: np.ndarray, targets: np.ndarray, row_folds: np.ndarray | None,
                  scorer: Scorer, *, options: Options) -> list[MethodScore]:
    """Every `auto` candidate, fitted on all rows and scored nested and in sample, each as its
    own submission would print it: decoded by the submission's decoder (thresholds fitted on
    the other folds, say), so auto picks what scores best as submitted, not by argmax."""
    table = []
    for method, method_options in auto_candidates(options, oof_stack.shape, row_folds,
                                                  scorer.metric):
        fit = fit_method(method, oof_stack, targets, scorer, options=method_options)
        in_sample = fit.apply(oof_stack)
        honest = fitted_nested(method, oof_stack, targets, row_folds, scorer=scorer, options=method_options)
        honest = in_sample if honest is None else honest
        scores = submitted_scores(options.decode, in_sample, honest, targets, row_folds=row_folds, scorer=scorer)
        table.append(MethodScore(fit, honest, scores["out of fold"], scores["in sample"]))
    return table


def best_method(table: list[MethodScore], scorer: Scorer) -> int:
    """The index of the best nested score; ties go to the earlier (simpler) method."""
    best = 0
    for index, row in enumerate(table):
        if scorer.is_better(row.score_nested, table[best].score_nested):
            best = index
    return best


@dataclass
class AutoNested:
    """auto run on the other folds for each held fold, applied to it (auto_nested)."""

    oof: np.ndarray  # (N, C): each held fold combined by the method chosen and fitted without it
    labels: np.ndarray | None  # (N,): those rows decoded by a decoder fitted without it
    chosen: list[str]  # the method chosen for each held fold
    fold_scores: list[float]  # the metric on each held fold alone


def auto_nested(oof_stack: np.ndarray, targets: np.ndarray, row_folds: np.ndarray,
                scorer: Scorer, *, options: Options) -> AutoNested:
    """The honest OOF of `auto`: for each fold, the whole of auto done on the other folds alone,
    as the submission does it on every row, then applied to the held fold: the methods scored
    nested (by the other folds' own folds), the best fitted on those rows, and the submission's
    decoder (thresholds, cut-off) fitted on that fit's output there, argmax kept where the decoder
    did not beat it there. Choosing the best of several nested scores is itself a fit; this double
    nesting keeps its optimism out of the printed CV.

    Why the decoder is nested here too: before, the held folds' rows, each made by a method
    chosen without it, were assembled and the thresholds then fitted on the assembled rows of
    the other folds, i.e. on outputs of other methods on other scales (a ridge stack's grades
    beside a hill-climb's shrunk expected grades) made by fits that had seen the held fold's
    labels, and argmax vs thresholds was decided on every row. The printed figure was a
    different procedure from the submission's, with the held fold's labels inside: 0.8610
    printed where the best method's own nested score was 0.8524 and the held-out 0.8285 (issue
    26). Now each held fold goes through exactly the steps the submission goes through, seeing
    nothing of it. On six constructed ordinal cases (two members, 300 rows in 5 folds, QWK
    with thresholds, 3,000 held-out rows), printed minus held-out went from -0.018 ± 0.028 to
    +0.008 ± 0.013 (the best nested method of the table: +0.017); the folds' spread is noted."""
    out, labels = np.empty(oof_stack.shape[1:]), np.empty(oof_stack.shape[1], np.int64)
    chosen, decoded_any = [], False
    for fold in tqdm(np.unique(row_folds), desc="auto: nesting the choice", leave=False):
        held = row_folds == fold
        inner = score_methods(oof_stack[:, ~held], targets[~held], row_folds[~held], scorer,
                              options=options)
        best = inner[best_method(inner, scorer)]
        out[held] = best.fit.apply(oof_stack[:, held])
        decoded = fit_decoder(options.decode, best.fit.apply(oof_stack[:, ~held]), out[held],
                              targets[~held], row_folds=row_folds[~held], scorer=scorer, oof_nested=best.honest)
        decoded_any = decoded_any or decoded is not None
        labels[held] = out[held].argmax(1) if decoded is None else decoded.test_labels
        chosen.append(best.fit.label)
    fold_scores = [scorer.score_labels(targets[row_folds == k], labels[row_folds == k])
                   if decoded_any else scorer.score(targets[row_folds == k], out[row_folds == k])
                   for k in np.unique(row_folds)]
    return AutoNested(out, labels if decoded_any else None, chosen, fold_scores)


def _auto(oof_stack: np.ndarray, targets: np.ndarray, row_folds: np.ndarray | None,
          scorer: Scorer, *, options: Options,
          notes: list[str]) -> tuple[Fit, np.ndarray | None, list[MethodScore], AutoNested | None]:
    """(the chosen fit, the honest OOF or None when nothing could be nested, every method,
    auto done on the other folds for each held fold, or None where too few folds)."""
    table = score_methods(oof_stack, targets, row_folds, scorer, options=options)
    best = table[best_method(table, scorer)]
    folds = fold_count(row_folds)
    if folds < 2:
        notes.append("auto: one fold, so only the methods that fit nothing were tried, and the "
                     "choice between them is in sample")
        return best.fit, None, table, None
    if folds == 2:
        notes.append("auto: two folds, too few to nest the choice of method too: the CV is "
                     "the chosen method's nested score, optimistic by the choice")
        return best.fit, best.honest, table, None
    doubly = auto_nested(oof_stack, targets, row_folds, scorer, options=options)
    spread = np.asarray(doubly.fold_scores)
    notes.append(f"auto chose {best.fit.label} on every OOF row (for the test set); chosen on "
                 f"the other folds alone for each held fold: {', '.join(doubly.chosen)}; "
                 f"{scorer.metric} of those folds {spread.mean():.4f} ± {spread.std():.4f} "
                 f"({spread.min():.4f} to {spread.max():.4f})")
    return best.fit, doubly.oof, table, doubly


def combine_members(oof_stack: np.ndarray, test_stack: np.ndarray, targets: np.ndarray,
                    method: str, *, scorer: Scorer, row_folds: np.ndarray | None = None,
                    options: Options = Options()) -> Combined:
    """The ensemble of OOF and test predictions by `method`.

    Whatever is fitted (weights, a selection, a stacker, auto's choice of method) is fitted on
    every OOF row for the test set; with `row_folds` (each OOF row's fold) it is also scored
    honestly, each fold combined by a fit on the others. Fitted weights are kept only when that
    nested score beats equal weights.
    """
    notes: list[str] = []
    table: list[MethodScore] = []
    doubly = None
    if method == "auto":
        fit, honest, table, doubly = _auto(oof_stack, targets, row_folds, scorer, options=options, notes=notes)
    elif method == "fitted":
        weights, honest, used = _fitted_or_equal(oof_stack, targets, scorer, row_folds, notes=notes)
        fit = Fit("fitted" if used else "mean", weights)
    else:
        fit = fit_method(method, oof_stack, targets, scorer, options=options)
        honest = fitted_nested(method, oof_stack, targets, row_folds, scorer=scorer, options=options)
    fitted = method == "auto" or fit.method in FITTED_METHODS
    if fitted and honest is None:
        notes.append(f"{method}: fitted on the OOF rows with one fold, nothing to nest it in: "
                     f"its CV is in sample (optimistic)")
    notes += method_notes(method, fit, honest, oof_stack, targets=targets, scorer=scorer)
    oof = fit.apply(oof_stack)
    return Combined(oof=oof, test=fit.apply(test_stack), weights=fit.weights, notes=notes,
                    oof_nested=oof if honest is None else honest, fit=fit, table=table,
                    fitted=fitted, nested=honest is not None, choice_nested=doubly is not None,
                    nested_labels=None if doubly is None else doubly.labels,
                    fold_scores=[] if doubly is None else doubly.fold_scores)


def method_notes(method: str, fit: Fit, honest: np.ndarray | None, oof_stack: np.ndarray,
                 *, targets: np.ndarray, scorer: Scorer) -> list[str]:
    """What the report should say about the method used."""
    notes = []
    if method in ("hillclimb", "stack") and honest is not None:
        mean_score = scorer.score(targets, combine(oof_stack, "mean"))
        score = scorer.score(targets, honest)
        if scorer.is_better(mean_score, score):
            notes.append(f"{fit.label} scored {scorer.metric} {score:.4f} out of fold (nested), "
                         f"worse than the plain mean's {mean_score:.4f}; ensemble.method=auto "
                         f"chooses between them")
    if fit.method == "trimmed" and len(oof_stack) < 3:
        notes.append(f"trimmed mean needs 3 members, {len(oof_stack)} given: plain mean used")
    if fit.method == "rank":
        notes.append("rank outputs are scores, not probabilities; rows renormalised to be scored "
                     "and submitted")
        if scorer.metric != "roc_auc":
            notes.append(f"rank averaging suits ROC-AUC; the metric is {scorer.metric}")
    return notes


@dataclass
class ViewChoice:
    """Which of a member's views (its outputs) it submits from, chosen out of fold."""

    view: str  # chosen on every OOF row: what the test rows come from
    per_fold: list[str]  # chosen on the other folds, for each held fold
    nested: dict[str, float]  # each view's own score, out of fold (whatever it fits, nested)
    oof: np.ndarray  # (N, C): each fold from the view chosen on the other folds (honest)
    test: np.ndarray  # (N_test, C) of `view`


def _view_score(kind: str, probs: np.ndarray, targets: np.ndarray, scorer: Scorer) -> float:
    """A view's metric as the submission would decode it, fitted on these rows (a choice's
    training rows)."""
    if kind in ("thresholds", "cutoff"):
        return decoded_score(kind, scorer.metric, targets, probs, positive=scorer.positive)
    return scorer.score(targets, probs)


def _nested_score(kind: str, probs: np.ndarray, targets: np.ndarray, row_folds: np.ndarray,
                  *, scorer: Scorer) -> float:
    """A view's honest score: its decoder fitted on the other folds for each held one."""
    if kind == "thresholds":
        return decode_thresholds(probs, probs[:1], targets, row_folds).score_nested
    if kind == "cutoff":
        return decode_cutoff(probs, probs[:1], targets, scorer.metric, positive=scorer.positive,
                             row_folds=row_folds).score_nested
    return scorer.score(targets, probs)


def choose_views(views: dict[str, tuple[np.ndarray, np.ndarray]], targets: np.ndarray,
                 row_folds: np.ndarray, kind: str, *, scorer: Scorer) -> ViewChoice:
    """Choose, nested, which of a member's views ({name: (OOF (N, C), test)}) it submits from:
    for each held fold the view that scores best on the other folds (decoded as the ensemble
    will, `kind`), so the assembled OOF is honest; on every row, the view for the test set."""
    names = list(views)

    def best(rows: np.ndarray) -> str:  # by the metric's direction; a tie: the first view
        scores = [_view_score(kind, views[v][0][rows], targets[rows], scorer) for v in names]
        chosen = 0
        for index in range(1, len(names)):
            if scorer.is_better(scores[index], scores[chosen]):
                chosen = index
        return names[chosen]

    oof = np.empty_like(views[names[0]][0])
    per_fold = []
    for fold in np.unique(row_folds):
        held = row_folds == fold
        chosen = best(~held) if (~held).any() else names[0]
        oof[held] = views[chosen][0][held]
        per_fold.append(chosen)
    view = best(np.ones(len(targets), bool))
    nested_scores = {v: _nested_score(kind, views[v][0], targets, row_folds, scorer=scorer)
                     for v in names}
    return ViewChoice(view, per_fold, nested_scores, oof, views[view][1])


def decode_combined(kind: str, combined: Combined, targets: np.ndarray, row_folds: np.ndarray,
                    *, scorer: Scorer) -> Decoded | None:
    """The fitted decoder `kind` (thresholds, cutoff; argmax: None) of an ensemble, judged by its
    nested score; a note says so when it did not beat argmax."""
    decoded = fit_decoder(kind, combined.oof, combined.test, targets, row_folds=row_folds, scorer=scorer,
                          oof_nested=combined.oof_nested)
    if decoded is None:
        return None
    what = "thresholds" if kind == "thresholds" else f"a cut-off of {decoded.params[0]:.3f}"
    if not decoded.used:
        combined.notes.append(
            f"{what} scored {scorer.metric} {decoded.score_nested:.4f} out of fold (each fold "
            f"decoded by a fit on the others), not above argmax's {decoded.score_argmax:.4f}: "
            f"argmax used")
    return decoded


def fit_decoder(kind: str, oof: np.ndarray, test: np.ndarray, targets: np.ndarray,
                *, row_folds: np.ndarray | None, scorer: Scorer,
                oof_nested: np.ndarray | None = None) -> Decoded | None:
    """The decoder `kind` fitted on `oof` (thresholds, cutoff; argmax: None), its nested score
    taken on `oof_nested` (a fitted ensemble's honest mix; None: `oof`)."""
    if kind == "thresholds":
        return decode_thresholds(oof, test, targets, row_folds, oof_nested=oof_nested)
    if kind == "cutoff":
        return decode_cutoff(oof, test, targets, scorer.metric, positive=scorer.positive, row_folds=row_folds,
                             oof_nested=oof_nested)
    return None


def honest_scores(targets: np.ndarray, combined: Combined, decoded: Decoded | None,
                  scorer: Scorer) -> dict[str, float]:
    """{'out of fold': the honest CV, 'in sample': the figure fitted on the rows it scores}.

    The honest CV scores each fold with whatever was fitted (weights, thresholds, cut-off) on the
    other folds only; it is the number in the submission's name. auto with its choice nested:
    each fold as auto done on the other folds submits it, decoder included (auto_nested).
    """
    printed = _printed(decoded, combined.oof, combined.oof_nested, targets, scorer=scorer)
    if combined.nested_labels is not None:
        printed["out of fold"] = scorer.score_labels(targets, combined.nested_labels)
    return printed


def honest_predictions(combined: Combined,
                       decoded: Decoded | None) -> tuple[np.ndarray | None, np.ndarray]:
    """(the nested labels the honest CV scores, or None: it scores probabilities; the nested
    probabilities): each OOF row as a fit on the other folds predicts it."""
    if combined.nested_labels is not None:
        labels = combined.nested_labels
    elif decoded is not None and decoded.used:
        labels = decoded.nested_labels
    else:
        labels = None
    return labels, combined.oof if combined.oof_nested is None else combined.oof_nested


def honest_score_on(rows: np.ndarray, targets: np.ndarray, combined: Combined,
                    decoded: Decoded | None, *, scorer: Scorer) -> float:
    """The honest CV on the OOF rows of the mask `rows` alone."""
    labels, probs = honest_predictions(combined, decoded)
    if labels is not None:
        return scorer.score_labels(targets[rows], labels[rows])
    return scorer.score(targets[rows], probs[rows])


def honest_without(searched: list[int], row_folds: np.ndarray, targets: np.ndarray, *,
                   combined: Combined, decoded: Decoded | None, scorer: Scorer,
                   tuned: list[str]) -> tuple[dict[str, float], list[int]]:
    """(honest_scores, the folds they leave out): a fold on which `make tune` chose a member's
    settings (`searched`; the members `tuned`) scores that member at its luckiest, so the CV is
    taken without its rows, and says so, while other folds are left."""
    scores = honest_scores(targets, combined, decoded, scorer)
    searched = [k for k in searched if k in set(row_folds.tolist())]
    if not searched:
        return scores, []
    scored = ~np.isin(row_folds, searched)
    chose = f"fold(s) {searched} chose the settings of {', '.join(tuned)} (make tune)"
    if not scored.any():
        combined.notes.append(f"{chose}, and the CV has no other rows: it is optimistic")
        return scores, []
    every_row = scores["out of fold"]
    scores["out of fold"] = honest_score_on(scored, targets, combined, decoded, scorer=scorer)
    scores["in sample"] = in_sample_on(scored, targets, combined, decoded, scorer=scorer)
    combined.notes.append(
        f"{chose}: the CV and its in-sample figure leave out their {int((~scored).sum())} rows "
        f"({scorer.metric} with them {every_row:.4f}, optimistic; the members' and methods' "
        f"rows and argmax against the decoder score every row)")
    return scores, searched


def in_sample_on(rows: np.ndarray, targets: np.ndarray, combined: Combined,
                 decoded: Decoded | None, *, scorer: Scorer) -> float:
    """honest_scores' 'in sample' figure on the OOF rows of the mask `rows` alone."""
    if decoded is not None and decoded.used:
        return scorer.score_labels(targets[rows], decoded.oof_labels[rows])
    return scorer.score(targets[rows], combined.oof[rows])


def fold_spread(targets: np.ndarray, combined: Combined, decoded: Decoded | None,
                row_folds: np.ndarray, *, scorer: Scorer, skipped: Sequence[int] = ()) -> float:
    """The standard deviation over the folds of the honest CV (honest_scores' 'out of fold'),
    each fold scored alone: how much a score on that many rows varies. NaN under two folds.
    `skipped`: folds the CV leaves out (a member's search chose on them)."""
    scores = [honest_score_on(row_folds == k, targets, combined, decoded, scorer=scorer)
              for k in np.unique(row_folds) if k not in skipped]
    return float(np.nanstd(scores, ddof=1)) if len(scores) > 1 else float("nan")


def submitted_scores(kind: str, oof: np.ndarray, oof_nested: np.ndarray, targets: np.ndarray,
                     *, row_folds: np.ndarray | None, scorer: Scorer) -> dict[str, float]:
    """honest_scores of combined OOF rows (`oof` fitted on every row, `oof_nested` on the other
    folds) as the submission decodes them: what `make ensemble` of that method would print."""
    decoded = fit_decoder(kind, oof, oof[:1], targets, row_folds=row_folds, scorer=scorer, oof_nested=oof_nested)
    return _printed(decoded, oof, oof_nested, targets, scorer=scorer)


def _printed(decoded: Decoded | None, oof: np.ndarray, oof_nested: np.ndarray,
             targets: np.ndarray, *, scorer: Scorer) -> dict[str, float]:
    if decoded is not None and decoded.used:
        return {"out of fold": decoded.score_nested, "in sample": decoded.score_in_sample}
    return {"out of fold": scorer.score(targets, oof_nested),
            "in sample": scorer.score(targets, oof)}


def apply_decoding(decoding: dict, probs: np.ndarray) -> np.ndarray:
    """What a submission holds from ensemble probabilities, by a recorded decoding
    ({"kind": argmax|thresholds|cutoff, "thresholds": [...], "cutoff": c, "positive": k}):
    class indices (N,) of a fitted decoder, else the probabilities themselves."""
    if decoding["kind"] == "thresholds":
        return apply_thresholds(expected_grade(probs), np.asarray(decoding["thresholds"]))
    if decoding["kind"] == "cutoff":
        return labels_at_cutoff(probs, float(decoding["cutoff"]), int(decoding["positive"]))
    return probs
