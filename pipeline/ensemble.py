"""Average folds and models into one submission; reads only the probability files.

    python -m pipeline ensemble --data digits [--models "resnet18 timm-resnet50"] [ensemble.method=fitted]

Per model (a run folder `runs/<model>/`):
  - OOF  = its folds' `oof_tta.csv` (or `oof.csv` where a fold has no TTA file), concatenated and put
           in folds.csv order. Every fold file must hold exactly the ids folds.csv gives that fold,
           so OOF predictions made on a different split cannot leak into the score.
  - test = the mean of its folds' `test_probs.csv`; a full-data refit (`full/test_probs.csv`) joins
           with weight `ensemble.refit_weight` (the folds together weigh 1).
Across models, `ensemble.method`:
  mean     the plain average
  median   the per-cell median, rows renormalised
  trimmed  scipy's trim_mean cutting 20% at each end (the mean below 3 members), rows renormalised
  rank     the average of per-class rank-normalised probabilities: for ROC-AUC, where only the
           order matters and members are calibrated differently. Outputs are scores, not
           probabilities; rows are renormalised to be scored and submitted.
  fitted   non-negative weights summing to 1 (softmax-parametrised), fitted on the OOF predictions
           by minimising log-loss (the smooth proxy of every metric here; accuracy and QWK are
           step functions an optimiser cannot follow), starting from equal weights. If the fitted
           weights score worse than equal weights on the competition metric, equal weights are used.
Ordinal competitions with `ensemble.decode=thresholds` decode the expected grade sum_k k*p_k with
thresholds fitted on OOF to maximise QWK (coordinate search from 0.5, 1.5, ...); if they do not beat
argmax on OOF, argmax is kept. Fitted weights and thresholds are scored on the OOF they were fitted
on, so their CV is a little optimistic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import minimize
from scipy.special import softmax
from scipy.stats import rankdata, trim_mean

from pipeline.config import Config
from pipeline.folds import read_folds
from pipeline.metrics import (higher_is_better, is_better, quadratic_weighted_kappa, score,
                              score_labels)
from pipeline.submission import build_submission, score_against_solution, write_submission
from pipeline.utils import (PipelineError, format_table, markdown_table, summarize_offenders, warn,
                            write_text_atomic)

TRIM_FRACTION = 0.2  # trimmed mean: cut this share of the members at each end
FOLD_DIR = re.compile(r"^fold(\d+)$")


class EnsembleError(PipelineError):
    """The runs cannot be ensembled; the message names the run, file and remedy."""


@dataclass(frozen=True)
class Member:
    """One model's predictions, ready to combine."""

    name: str
    oof_ids: list[str]  # in folds.csv order
    oof: np.ndarray  # (N_oof, C) probabilities, rows of oof_ids
    test_ids: list[str]  # test-id order of the first fold
    test: np.ndarray  # (N_test, C) folds' mean, with the refit joined
    oof_source: str  # which OOF files were used: oof_tta, oof, or both by fold
    n_folds: int
    refit: bool  # whether full/test_probs.csv joined the test average


@dataclass
class Combined:
    """The ensemble's predictions and how they were made."""

    oof: np.ndarray  # (N_oof, C), rows sum to 1
    test: np.ndarray  # (N_test, C), rows sum to 1
    weights: np.ndarray | None  # per member; None for median/trimmed (not a weighted average)
    notes: list[str] = field(default_factory=list)


@dataclass
class Decoded:
    """Hard labels from thresholds on the expected grade (ordinal competitions)."""

    thresholds: np.ndarray  # (C-1,) sorted
    oof_labels: np.ndarray  # (N_oof,) class indices
    test_labels: np.ndarray  # (N_test,)
    qwk_argmax: float
    qwk_thresholds: float
    used: bool  # False: thresholds did not beat argmax on OOF, argmax kept


@dataclass
class EnsembleOutcome:
    """What `ensemble_runs` wrote, for the demo and refit stages."""

    name: str
    submission: Path
    report: Path
    cv_score: float
    solution_score: float | None


# --------------------------------------------------------------------------------------------
# Finding runs and reading probability files


def parse_models(text: str | None) -> list[str] | None:
    """'a b,c' -> ['a', 'b', 'c']; model names map to run names as in the config (`/` -> `-`)."""
    if not text or not text.strip():
        return None
    names = [part for part in re.split(r"[\s,]+", text.strip()) if part]
    return [Path(n).stem if n.endswith((".yaml", ".yml")) else n.replace("/", "-") for n in names]


def fold_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(k, run_dir/fold<k>) for the folds that have test predictions, by k."""
    found = []
    for path in run_dir.glob("fold*"):
        match = FOLD_DIR.match(path.name)
        if match and (path / "test_probs.csv").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def run_competition(run_dir: Path) -> str | None:
    """data.name from the first fold's saved config.yaml; None when no fold saved one."""
    for _, fold_dir in fold_dirs(run_dir):
        path = fold_dir / "config.yaml"
        if path.is_file():
            saved = yaml.safe_load(path.read_text()) or {}
            return (saved.get("data") or {}).get("name")
    return None


def discover_runs(runs_dir: Path, competition: str) -> list[str]:
    """Every run of `competition` under `runs_dir` with fold test predictions, by name."""
    runs_dir = Path(runs_dir)
    candidates = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    names = []
    for run_dir in candidates:
        if not fold_dirs(run_dir):
            continue
        owner = run_competition(run_dir)
        if owner is None:
            warn(f"{run_dir} has predictions but no fold*/config.yaml saying its competition; "
                 f"name it in MODELS= to include it")
        elif owner == competition:
            names.append(run_dir.name)
    return names


def read_probabilities(path: Path, classes: list[str], with_label: bool = False) -> pd.DataFrame:
    """A probability CSV: `id` (+ `label`) as strings, one float column per class, checked."""
    frame = pd.read_csv(path, dtype={"id": str, "label": str}, keep_default_na=False)
    meta = ["id"] + (["label"] if with_label else [])
    required = meta + list(classes)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise EnsembleError(f"{path}: missing column(s) {missing}; columns are "
                            f"{list(frame.columns)}. The file was made for other classes than "
                            f"{classes}: re-run `make predict` for this model.")
    dupes = sorted(set(frame["id"][frame["id"].duplicated()]))
    if dupes:
        raise EnsembleError(f"{path}: duplicated ids {summarize_offenders(dupes)}")
    probs = frame[list(classes)].apply(pd.to_numeric, errors="coerce")
    bad = probs.isna().any(axis=1)
    if bad.any():
        raise EnsembleError(f"{path}: missing or non-numeric probabilities for id(s) "
                            f"{summarize_offenders(frame.loc[bad, 'id'].tolist())}; re-run "
                            f"`make predict` for this model")
    return pd.concat([frame[meta], probs], axis=1)


def _read_fold_oof(fold: int, fold_dir: Path, folds: pd.DataFrame,
                   classes: list[str]) -> tuple[pd.DataFrame, str]:
    """One fold's OOF (TTA when present) after checking it holds exactly that fold's ids."""
    for name in ("oof_tta.csv", "oof.csv"):
        if (fold_dir / name).is_file():
            path = fold_dir / name
            break
    else:
        raise EnsembleError(f"{fold_dir} has test_probs.csv but no oof_tta.csv or oof.csv; "
                            f"re-run `make predict` (or train) for this model")
    oof = read_probabilities(path, classes, with_label=True)
    expected = folds.loc[folds["fold"] == fold, ["id", "label"]]
    wrong = sorted(set(oof["id"]) ^ set(expected["id"]))
    if wrong:
        raise EnsembleError(f"{path}: its ids are not fold {fold} of {len(expected)} ids in "
                            f"folds.csv ({summarize_offenders(wrong)} differ): folds.csv was "
                            f"re-split after this model was trained; retrain it (FORCE=1)")
    truth = expected.set_index("id")["label"].reindex(oof["id"]).to_numpy()
    relabelled = oof.loc[oof["label"].to_numpy() != truth, "id"].tolist()
    if relabelled:
        raise EnsembleError(f"{path}: labels differ from folds.csv for id(s) "
                            f"{summarize_offenders(relabelled)}; retrain on the current data")
    return oof, path.stem


def _describe_sources(sources: dict[int, str]) -> str:
    kinds = sorted(set(sources.values()))
    if len(kinds) == 1:
        return kinds[0]
    return ", ".join(f"{kind} (fold {','.join(str(k) for k, v in sources.items() if v == kind)})"
                     for kind in kinds)


def _aligned_test(path: Path, classes: list[str],
                  ids: list[str] | None) -> tuple[list[str], np.ndarray]:
    """Test probabilities (N, C), rows put in `ids` order (the first file's when None)."""
    frame = read_probabilities(path, classes)
    if ids is None:
        return frame["id"].tolist(), frame[classes].to_numpy(np.float64)
    differ = sorted(set(frame["id"]) ^ set(ids))
    if differ:
        raise EnsembleError(f"{path}: its test ids differ from the other folds' "
                            f"({summarize_offenders(differ)}); re-run `make predict` for this model")
    return ids, frame.set_index("id").loc[ids, classes].to_numpy(np.float64)


def load_member(run_dir: Path, folds: pd.DataFrame, classes: list[str],
                refit_weight: float) -> Member:
    """One model's OOF (folds.csv order) and test average (folds weigh 1, a refit `refit_weight`)."""
    folds_found = fold_dirs(run_dir)
    if not folds_found:
        raise EnsembleError(f"{run_dir} has no fold*/test_probs.csv: run `make train predict "
                            f"MODEL={run_dir.name}` first")
    parts, sources, test_ids, tests = [], {}, None, []
    for k, fold_dir in folds_found:
        oof, sources[k] = _read_fold_oof(k, fold_dir, folds, classes)
        parts.append(oof)
        test_ids, probs = _aligned_test(fold_dir / "test_probs.csv", classes, test_ids)
        tests.append(probs)
    test = np.mean(tests, axis=0)

    refit_path = run_dir / "full" / "test_probs.csv"
    refit = refit_path.is_file() and refit_weight > 0
    if refit:
        _, full = _aligned_test(refit_path, classes, test_ids)
        test = (test + refit_weight * full) / (1.0 + refit_weight)

    oof = pd.concat(parts).set_index("id")
    order = [i for i in folds["id"] if i in oof.index]  # folds.csv order
    return Member(name=run_dir.name, oof_ids=order, oof=oof.loc[order, classes].to_numpy(np.float64),
                  test_ids=test_ids, test=test, oof_source=_describe_sources(sources),
                  n_folds=len(folds_found), refit=refit)


def check_members_agree(members: list[Member]) -> None:
    """Members must predict the same OOF ids (the same folds) and the same test ids."""
    all_oof = set().union(*(m.oof_ids for m in members))
    short = [(m.name, len(all_oof - set(m.oof_ids))) for m in members
             if len(m.oof_ids) < len(all_oof)]
    if short:
        listed = "; ".join(f"{name} misses {n} of {len(all_oof)} OOF ids" for name, n in short)
        raise EnsembleError(f"members cover different OOF ids: {listed}. Train and predict the "
                            f"missing folds (make train predict MODEL=<model>) or leave the model "
                            f"out with MODELS=")
    reference = members[0]
    for member in members[1:]:
        differ = sorted(set(member.test_ids) ^ set(reference.test_ids))
        if differ:
            raise EnsembleError(f"{member.name} and {reference.name} predicted different test ids "
                                f"({summarize_offenders(differ)}); re-run `make predict` for both")


def stack_members(members: list[Member]) -> tuple[np.ndarray, np.ndarray]:
    """(M, N_oof, C) and (M, N_test, C), every member in the first member's row order."""
    ids, test_ids = members[0].oof_ids, members[0].test_ids
    oof = np.stack([m.oof[pd.Index(m.oof_ids).get_indexer(ids)] for m in members])
    test = np.stack([m.test[pd.Index(m.test_ids).get_indexer(test_ids)] for m in members])
    return oof, test


# --------------------------------------------------------------------------------------------
# Combining


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


def _equal(members: int) -> np.ndarray:
    return np.full(members, 1.0 / members)


def combine_members(oof_stack: np.ndarray, test_stack: np.ndarray, targets: np.ndarray,
                    method: str, metric: str) -> Combined:
    """The ensemble of OOF and test predictions by `method`; fitted weights come from the OOF."""
    members = len(oof_stack)
    notes: list[str] = []
    weights: np.ndarray | None = _equal(members)
    if method == "fitted":
        fitted = fit_weights(oof_stack, targets)
        equal_score = score(metric, targets, combine(oof_stack, "mean"))
        fitted_score = score(metric, targets, combine(oof_stack, "fitted", fitted))
        if is_better(metric, equal_score, fitted_score):
            notes.append(f"fitted weights scored {metric} {fitted_score:.4f} OOF, worse than equal "
                         f"weights ({equal_score:.4f}): equal weights used")
        else:
            weights = fitted
    elif method == "trimmed" and members < 3:
        notes.append(f"trimmed mean needs 3 members, {members} given: plain mean used")
    elif method in ("median", "trimmed"):
        weights = None  # not a weighted average
    elif method == "rank":
        notes.append("rank outputs are scores, not probabilities; rows renormalised to be scored "
                     "and submitted")
        if metric != "roc_auc":
            notes.append(f"rank averaging suits ROC-AUC; the metric is {metric}")
    return Combined(oof=combine(oof_stack, method, weights),
                    test=combine(test_stack, method, weights), weights=weights, notes=notes)


# --------------------------------------------------------------------------------------------
# Ordinal decoding


def expected_grade(probs: np.ndarray) -> np.ndarray:
    """sum_k k * p_k per row (N,): a continuous grade that thresholds cut into classes."""
    return probs @ np.arange(probs.shape[1], dtype=np.float64)


def apply_thresholds(grades: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Class = how many (sorted) thresholds the grade reaches."""
    return np.digitize(grades, np.sort(thresholds)).astype(np.int64)


def fit_thresholds(grades: np.ndarray, targets: np.ndarray, n_classes: int,
                   passes: int = 4, candidates: int = 48) -> np.ndarray:
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


def decode_thresholds(oof: np.ndarray, test: np.ndarray, targets: np.ndarray) -> Decoded:
    """Fit thresholds on OOF expected grades, apply them to test; keep argmax if they do not help."""
    n_classes = oof.shape[1]
    thresholds = fit_thresholds(expected_grade(oof), targets, n_classes)
    oof_labels = apply_thresholds(expected_grade(oof), thresholds)
    qwk_argmax = quadratic_weighted_kappa(targets, oof.argmax(axis=1), n_classes)
    qwk_thresholds = quadratic_weighted_kappa(targets, oof_labels, n_classes)
    used = qwk_thresholds >= qwk_argmax
    if not used:
        oof_labels = oof.argmax(axis=1)
        test_labels = test.argmax(axis=1)
    else:
        test_labels = apply_thresholds(expected_grade(test), thresholds)
    return Decoded(thresholds=thresholds, oof_labels=oof_labels, test_labels=test_labels,
                   qwk_argmax=qwk_argmax, qwk_thresholds=qwk_thresholds, used=used)


# --------------------------------------------------------------------------------------------
# The stage


def _check_decode(config: Config) -> None:
    if config.ensemble.decode != "thresholds":
        return
    if not config.data.ordinal:
        raise EnsembleError(f"ensemble.decode=thresholds needs ordinal classes; {config.data.name} "
                            f"has data.ordinal: false. Use ensemble.decode=argmax")
    if config.data.submission != "label":
        raise EnsembleError(f"ensemble.decode=thresholds makes labels, but {config.data.name} "
                            f"takes probabilities (data.submission); use ensemble.decode=argmax")


def select_runs(config: Config, models: list[str] | None) -> list[str]:
    """The named runs (checked to belong to this competition), or every run of it."""
    runs_dir = Path(config.runs_dir)
    if models is None:
        found = discover_runs(runs_dir, config.data.name)
        if not found:
            raise EnsembleError(f"no run of {config.data.name} with predictions in {runs_dir}/: "
                                f"run `make train predict MODEL=<model> DATA={config.data.name}`")
        return found
    for name in models:
        if not fold_dirs(runs_dir / name):
            available = discover_runs(runs_dir, config.data.name)
            raise EnsembleError(f"{runs_dir / name} has no fold*/test_probs.csv: run `make train "
                                f"predict MODEL={name} DATA={config.data.name}` first; runs of "
                                f"{config.data.name} with predictions: {available or 'none'}")
        owner = run_competition(runs_dir / name)
        if owner is not None and owner != config.data.name:
            raise EnsembleError(f"{runs_dir / name} was trained on {owner}, not "
                                f"{config.data.name}; leave it out of MODELS or set DATA={owner}")
    if len(set(models)) != len(models):
        raise EnsembleError(f"MODELS names a run twice: {models}")
    return models


def submission_name(config: Config, models: list[str], cv_score: float) -> str:
    return config.ensemble.name or f"{'+'.join(models)}_cv{cv_score:.4f}"


def _score_columns(metric: str) -> list[str]:
    return [metric] + (["accuracy"] if metric != "accuracy" else [])


def _scores(metric: str, targets: np.ndarray, probs: np.ndarray) -> list[float]:
    return [score(m, targets, probs) for m in _score_columns(metric)]


def _label_scores(metric: str, targets: np.ndarray, labels: np.ndarray,
                  n_classes: int) -> list[float]:
    return [score_labels(m, targets, labels, n_classes) for m in _score_columns(metric)]


def _weight_cell(weights: np.ndarray | None, index: int) -> float | str:
    return "-" if weights is None else float(weights[index])


def score_rows(members: list[Member], combined: Combined, decoded: Decoded | None,
               targets: np.ndarray, metric: str, method: str) -> list[list]:
    """One row per member and one for the ensemble (and its threshold decoding)."""
    rows = []
    for i, m in enumerate(members):
        rows.append([m.name, m.oof_source, m.n_folds, "yes" if m.refit else "no",
                     _weight_cell(combined.weights, i), *_scores(metric, targets, m.oof)])
    rows.append([f"ensemble ({method})", "", "", "", "", *_scores(metric, targets, combined.oof)])
    if decoded is not None and decoded.used:
        rows.append(["ensemble + thresholds", "", "", "", "",
                     *_label_scores(metric, targets, decoded.oof_labels, combined.oof.shape[1])])
    return rows


def ensemble_runs(config: Config, models: list[str] | None = None) -> EnsembleOutcome:
    """Ensemble the runs' probability files, write the submission and its report."""
    _check_decode(config)
    names = select_runs(config, models)
    folds = read_folds(config)
    classes, metric = config.data.classes, config.data.metric
    members = [load_member(Path(config.runs_dir) / name, folds, classes,
                           config.ensemble.refit_weight) for name in names]
    check_members_agree(members)
    targets = folds.set_index("id").loc[members[0].oof_ids, "target"].to_numpy(np.int64)
    oof_stack, test_stack = stack_members(members)

    method = config.ensemble.method
    combined = combine_members(oof_stack, test_stack, targets, method, metric)
    decoded = (decode_thresholds(combined.oof, combined.test, targets)
               if config.ensemble.decode == "thresholds" else None)
    if decoded is not None and not decoded.used:
        combined.notes.append(f"thresholds scored QWK {decoded.qwk_thresholds:.4f} OOF, below argmax "
                              f"({decoded.qwk_argmax:.4f}): argmax used")
    if decoded is not None and decoded.used:
        cv_score = score_labels(metric, targets, decoded.oof_labels, len(classes))
        predictions = decoded.test_labels
    else:
        cv_score = score(metric, targets, combined.oof)
        predictions = combined.test

    name = submission_name(config, names, cv_score)
    submissions = Path(config.submissions_dir)
    frame = build_submission(config.data, members[0].test_ids, predictions)
    csv_path = write_submission(frame, submissions / f"{name}.csv", config.data)
    solution_score = score_against_solution(config.data, frame)

    rows = score_rows(members, combined, decoded, targets, metric, method)
    headers = ["model", "oof", "folds", "refit", "weight",
               *(f"oof {m}" for m in _score_columns(metric))]
    details = _details(config, names, combined, decoded, csv_path, cv_score, solution_score)
    print(format_table(rows, headers))
    for note in combined.notes:
        print(f"note: {note}")
    print(format_table([row for row in details if not row[0].startswith("test ")],
                       ["ensemble", "value"]))
    if solution_score is not None:
        print(f"test {metric} vs {config.data.solution_csv}: {solution_score:.4f}")
    report_path = submissions / f"{name}.md"
    write_text_atomic(report_path, _markdown_report(name, rows, headers, details, combined.notes))
    print(f"wrote {csv_path} and {report_path}")
    return EnsembleOutcome(name=name, submission=csv_path, report=report_path, cv_score=cv_score,
                           solution_score=solution_score)


def kaggle_command(config: Config, names: list[str], csv_path: Path, cv_score: float) -> str:
    return (f'kaggle competitions submit -c {config.data.name} -f {csv_path} '
            f'-m "{"+".join(names)} cv={cv_score:.4f}"')


def _details(config: Config, names: list[str], combined: Combined, decoded: Decoded | None,
             csv_path: Path, cv_score: float, solution_score: float | None) -> list[list[str]]:
    metric = config.data.metric
    weights = (f"none ({config.ensemble.method} is unweighted)" if combined.weights is None else
               ", ".join(f"{n} {w:.3f}" for n, w in zip(names, combined.weights)))
    direction = "higher" if higher_is_better(metric) else "lower"
    rows = [["method", config.ensemble.method], ["weights", weights],
            ["decode", config.ensemble.decode], ["refit weight", f"{config.ensemble.refit_weight:g}"],
            [f"OOF {metric} ({direction} is better)", f"{cv_score:.4f}"]]
    if decoded is not None:
        rows.append(["OOF QWK argmax vs thresholds",
                     f"{decoded.qwk_argmax:.4f} vs {decoded.qwk_thresholds:.4f}"])
        rows.append(["thresholds", ", ".join(f"{t:.3f}" for t in decoded.thresholds)])
    rows.append(["submission", str(csv_path)])
    if solution_score is not None:
        rows.append([f"test {metric} vs {config.data.solution_csv}", f"{solution_score:.4f}"])
    rows.append(["upload", kaggle_command(config, names, csv_path, cv_score)])
    return rows


def _markdown_report(name: str, rows: list[list], headers: list[str], details: list[list[str]],
                     notes: list[str]) -> str:
    lines = [f"# Submission {name}", "", markdown_table(rows, headers), ""]
    lines += [f"- **{key}**: `{value}`" if key == "upload" else f"- **{key}**: {value}"
              for key, value in details]
    lines += [f"- note: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(args) -> None:
    from pipeline.config import load_config

    config = load_config(args.data, None, args.overrides)
    ensemble_runs(config, parse_models(args.models))
