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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import minimize
from scipy.special import softmax
from scipy.stats import rankdata, trim_mean

from pipeline.decode import (Decoded, decode_cutoff, decode_thresholds, decoder_kind,
                             nested)
from pipeline.config import Config, EnsembleConfig, TTAConfig, config_from_dict, training_settings
from pipeline.folds import read_folds
from pipeline.provenance import (Freshness, fingerprint, freshness, manifest_path, read_manifest,
                                 write_manifest)
from pipeline.metrics import (higher_is_better, is_better, score,
                              score_labels)
from pipeline.submission import build_submission, resolved_submission_kind, score_against_solution, write_submission
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
    missing_folds: list[int] = field(default_factory=list)  # --partial: folds not trained


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
    """(k, run_dir/fold<k>) for the fold folders of a run, by k."""
    found = []
    for path in Path(run_dir).glob("fold*"):
        match = FOLD_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def experiment_config(run_dir: Path) -> Config | None:
    """The resolved config an experiment was trained with (runs/<c>/<exp>/config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    return config_from_dict(yaml.safe_load(path.read_text()) or {})


def discover_runs(config: Config) -> list[str]:
    """Every experiment folder of the competition (runs/<competition>/<name>/config.yaml)."""
    root = config.competition_runs
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.yaml").is_file())


@dataclass
class MemberCheck:
    """What `check_member` found: the folds to read, the refit's use, and what is wrong."""

    name: str
    config: Config | None
    folds: list[int]  # current folds with current predictions
    missing: list[int]  # folds of the fold file not (currently) trained or predicted
    refit: bool  # a current refit joins the test average
    problems: list[str]  # why the member cannot be used as it is, each with its remedy


def check_member(name: str, config: Config, folds: pd.DataFrame, test_fingerprint: str,
                 refit_weight: float | None) -> MemberCheck:
    """Whether experiment `name` can join the ensemble: every fold of the fold file trained and
    predicted under the inputs of now, and its refit (if used) trained under its settings."""
    from pipeline.predict import prediction_freshness
    from pipeline.refit import refit_inputs
    from pipeline.train import train_freshness, training_inputs

    run_dir = config.competition_runs / name
    member = experiment_config(run_dir)
    if member is None:
        return MemberCheck(name, None, [], [], False, [
            f"{run_dir} is no experiment of {config.data.name}: run `make train "
            f"DATA={config.data.name} MODEL={name}`"])
    problems, usable, missing = [], [], []
    inputs, details = training_inputs(member, folds)
    for k in sorted(int(f) for f in folds["fold"].unique()):
        trained = train_freshness(member, k, inputs, details)
        if trained.state == "missing":
            missing.append(k)
            continue
        if trained.state == "stale":
            problems.append(f"fold {k} is stale ({trained.why()}): `make train MODEL={name} "
                            f"FORCE=1` retrains it")
            continue
        fold_dir = run_dir / f"fold{k}"
        predicted = prediction_freshness(member, fold_dir, test_fingerprint,
                                         folds[folds["fold"] == k])
        if not predicted.current:
            problems.append(f"fold {k}'s predictions are {predicted.state} ({predicted.why()}): "
                            f"run `make predict MODEL={name}`")
            continue
        usable.append(k)
    weight = member.ensemble.refit_weight if refit_weight is None else refit_weight
    full = run_dir / "full"
    refit = False
    if weight > 0 and (full / "train.manifest.json").is_file():
        refit_problem = _refit_problem(member, folds, full, test_fingerprint, refit_inputs)
        if refit_problem:
            problems.append(f"{refit_problem}; or leave the refit out: "
                            f"ARGS=ensemble.refit_weight=0")
        else:
            refit = True
    views = {json.dumps(tta.model_dump(), sort_keys=True) for tta in member_ttas(
        run_dir, usable, refit).values()}
    if len(views) > 1:
        problems.append(f"its folds were predicted with different TTA settings ({sorted(views)}): "
                        f"`make predict MODEL={name} TTA=<views>` predicts them all alike")
    return MemberCheck(name, member, usable, missing, refit, problems)


def member_ttas(run_dir: Path, folds: list[int], refit: bool) -> dict[str, TTAConfig]:
    """The TTA settings each used part (fold<k>, full) of an experiment was predicted with."""
    from pipeline.predict import recorded_tta

    parts = [f"fold{k}" for k in folds] + (["full"] if refit else [])
    found = {part: recorded_tta(Path(run_dir) / part) for part in parts}
    return {part: tta for part, tta in found.items() if tta is not None}


def _refit_problem(member: Config, folds: pd.DataFrame, full: Path, test_fingerprint: str,
                   refit_inputs) -> str | None:
    from pipeline.predict import prediction_freshness

    try:
        inputs, details, *_ = refit_inputs(member, folds)
    except PipelineError as err:
        return f"its refit cannot be checked: {err}"
    trained = freshness(manifest_path(full, "train"), inputs, details)
    if not trained.current:
        return f"its refit is stale ({trained.why()}): `make refit MODEL={member.run_name} FORCE=1`"
    predicted = prediction_freshness(member, full, test_fingerprint, None)
    if not predicted.current:
        return (f"its refit's predictions are {predicted.state} ({predicted.why()}): "
                f"`make refit MODEL={member.run_name}`")
    return None


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


def aligned_test(path: Path, classes: list[str],
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


def load_member(check: MemberCheck, folds: pd.DataFrame, classes: list[str],
                refit_weight: float) -> Member:
    """One model's OOF (fold-file order) and test average (folds weigh 1, a refit `refit_weight`),
    from the folds `check_member` found current."""
    run_dir = check.config.run_dir
    parts, sources, test_ids, tests = [], {}, None, []
    for k in check.folds:
        fold_dir = run_dir / f"fold{k}"
        oof, sources[k] = _read_fold_oof(k, fold_dir, folds, classes)
        parts.append(oof)
        test_ids, probs = aligned_test(fold_dir / "test_probs.csv", classes, test_ids)
        tests.append(probs)
    test = np.mean(tests, axis=0)

    refit = check.refit and refit_weight > 0
    if refit:
        _, full = aligned_test(run_dir / "full" / "test_probs.csv", classes, test_ids)
        test = (test + refit_weight * full) / (1.0 + refit_weight)

    oof = pd.concat(parts).set_index("id")
    order = [i for i in folds["id"] if i in oof.index]  # fold-file order
    return Member(name=check.name, oof_ids=order, oof=oof.loc[order, classes].to_numpy(np.float64),
                  test_ids=test_ids, test=test, oof_source=_describe_sources(sources),
                  n_folds=len(check.folds), refit=refit, missing_folds=list(check.missing))


def seed_family(config: Config) -> str:
    """Runs with equal settings but for train.seed belong to one family (SEEDS=0,1,2)."""
    settings = training_settings(config.to_dict())
    settings.get("train", {}).pop("seed", None)
    return fingerprint(settings)


def average_seeds(members: list[Member], families: list[str]) -> list[Member]:
    """Members of one seed family become one member: the mean of their OOF and test rows."""
    grouped: dict[str, list[Member]] = {}
    for member, family in zip(members, families):
        grouped.setdefault(family, []).append(member)
    merged = []
    for group in grouped.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        ids, test_ids = group[0].oof_ids, group[0].test_ids
        common = [i for i in ids if all(i in set(m.oof_ids) for m in group[1:])]
        oof = np.mean([m.oof[pd.Index(m.oof_ids).get_indexer(common)] for m in group], axis=0)
        test = np.mean([m.test[pd.Index(m.test_ids).get_indexer(test_ids)] for m in group], axis=0)
        merged.append(Member(
            name=" + ".join(m.name for m in group), oof_ids=common, oof=oof, test_ids=test_ids,
            test=test, oof_source=group[0].oof_source, n_folds=min(m.n_folds for m in group),
            refit=any(m.refit for m in group),
            missing_folds=sorted({k for m in group for k in m.missing_folds})))
    return merged


def check_members_agree(members: list[Member], partial: bool = False) -> None:
    """Members must predict the same OOF ids (the same folds) and the same test ids.

    With `partial` (a member allowed to miss folds), the OOF is scored over the ids every member
    covers, and the report says so.
    """
    all_oof = set().union(*(m.oof_ids for m in members))
    short = [(m.name, len(all_oof - set(m.oof_ids))) for m in members
             if len(m.oof_ids) < len(all_oof)]
    if short and not partial:
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


def stack_members(members: list[Member]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(OOF ids, (M, N_oof, C), (M, N_test, C)): the OOF ids every member covers, in the first
    member's order, and every member's rows in that order."""
    covered = set.intersection(*(set(m.oof_ids) for m in members))
    ids, test_ids = [i for i in members[0].oof_ids if i in covered], members[0].test_ids
    oof = np.stack([m.oof[pd.Index(m.oof_ids).get_indexer(ids)] for m in members])
    test = np.stack([m.test[pd.Index(m.test_ids).get_indexer(test_ids)] for m in members])
    return ids, oof, test


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


def nested_fitted_mix(oof_stack: np.ndarray, targets: np.ndarray,
                      row_folds: np.ndarray) -> np.ndarray:
    """The fitted-weights mix of each fold's OOF rows with weights fitted on the other folds."""
    return nested(lambda train: fit_weights(oof_stack[:, train], targets[train]),
                  lambda weights, held: combine(oof_stack[:, held], "fitted", weights),
                  row_folds, oof_stack.shape[1])


def combine_members(oof_stack: np.ndarray, test_stack: np.ndarray, targets: np.ndarray,
                    method: str, metric: str, row_folds: np.ndarray | None = None,
                    positive: int = 1) -> Combined:
    """The ensemble of OOF and test predictions by `method`.

    Fitted weights are fitted on every OOF row for the test set; with `row_folds` (each OOF row's
    fold) they are also scored honestly, each fold mixed by weights fitted on the others, and
    kept only when that nested score beats equal weights.
    """
    members = len(oof_stack)
    notes: list[str] = []
    weights: np.ndarray | None = _equal(members)
    oof_nested = None
    if method == "fitted":
        fitted = fit_weights(oof_stack, targets)
        equal = combine(oof_stack, "mean")
        honest = (nested_fitted_mix(oof_stack, targets, row_folds)
                  if row_folds is not None and len(np.unique(row_folds)) > 1
                  else combine(oof_stack, "fitted", fitted))
        equal_score = score(metric, targets, equal, positive)
        fitted_score = score(metric, targets, honest, positive)
        how = "out of fold (nested)" if row_folds is not None else "in sample"
        if is_better(metric, equal_score, fitted_score):
            notes.append(f"fitted weights scored {metric} {fitted_score:.4f} {how}, worse than "
                         f"equal weights ({equal_score:.4f}): equal weights used")
        else:
            weights, oof_nested = fitted, honest
    elif method == "trimmed" and members < 3:
        notes.append(f"trimmed mean needs 3 members, {members} given: plain mean used")
    elif method in ("median", "trimmed"):
        weights = None  # not a weighted average
    elif method == "rank":
        notes.append("rank outputs are scores, not probabilities; rows renormalised to be scored "
                     "and submitted")
        if metric != "roc_auc":
            notes.append(f"rank averaging suits ROC-AUC; the metric is {metric}")
    oof = combine(oof_stack, method, weights)
    return Combined(oof=oof, test=combine(test_stack, method, weights), weights=weights,
                    notes=notes, oof_nested=oof if oof_nested is None else oof_nested)


# --------------------------------------------------------------------------------------------
# The stage


def _check_decode(config: Config, settings: EnsembleConfig) -> None:
    if settings.decode == "cutoff" and (len(config.data.classes) != 2 or
                                        resolved_submission_kind(config.data) != "label"):
        raise EnsembleError(f"ensemble.decode=cutoff makes binary labels; {config.data.name} has "
                            f"{len(config.data.classes)} classes and a "
                            f"{resolved_submission_kind(config.data)} submission. Use "
                            f"ensemble.decode=auto")
    if settings.decode != "thresholds":
        return
    if not config.data.ordinal:
        raise EnsembleError(f"ensemble.decode=thresholds needs ordinal classes; {config.data.name} "
                            f"has data.ordinal: false. Use ensemble.decode=argmax")
    if resolved_submission_kind(config.data) != "label":
        raise EnsembleError(f"ensemble.decode=thresholds makes labels, but {config.data.name} "
                            f"takes probabilities (data.submission); use ensemble.decode=argmax")


def select_members(config: Config, models: list[str] | None, folds: pd.DataFrame,
                   test_fingerprint: str, partial: bool,
                   refit_weight: float | None) -> tuple[list[MemberCheck], list[str]]:
    """The members to ensemble and notes on the runs left out.

    Named members (MODELS=) must be current and complete (with `partial`, folds may be missing,
    never stale); any other is refused with what is wrong and the remedy. Without MODELS, every
    current and complete experiment of the competition is used and the others are listed.
    """
    found = discover_runs(config)
    if models is not None:
        if len(set(models)) != len(models):
            raise EnsembleError(f"MODELS names a run twice: {models}")
        unknown = [m for m in models if m not in found]
        if unknown:
            raise EnsembleError(f"no experiment {', '.join(unknown)} of {config.data.name} in "
                                f"{config.competition_runs}/: run `make train predict MODEL=<name> "
                                f"DATA={config.data.name}` first; experiments of "
                                f"{config.data.name}: {found or 'none'}")
    elif not found:
        raise EnsembleError(f"no experiment of {config.data.name} in {config.competition_runs}/: "
                            f"run `make train predict MODEL=<model> DATA={config.data.name}`")
    checks = [check_member(name, config, folds, test_fingerprint, refit_weight)
              for name in (models or found)]
    for check in checks:
        if check.missing and not (partial and check.folds):
            what = "no fold" if not check.folds else f"fold(s) {check.missing} of the fold file"
            check.problems.append(
                f"{what} trained: `make train predict MODEL={check.name}`"
                + ("" if not check.folds else " (or PARTIAL=1 to ensemble the folds it has)"))
    if models is not None:
        refused = [c for c in checks if c.problems]
        if refused:
            raise EnsembleError("cannot ensemble:\n" + "\n".join(
                f"  {c.name}: " + "\n    ".join(c.problems) for c in refused))
        return checks, []
    usable = [c for c in checks if not c.problems]
    notes = [f"left out {c.name}: {'; '.join(c.problems)}" for c in checks if c.problems]
    if not usable:
        raise EnsembleError(f"no experiment of {config.data.name} is current and complete:\n  "
                            + "\n  ".join(notes) + "\n(`make runs` shows every experiment)")
    return usable, notes


def ensemble_settings(config: Config, members: list[Config], overrides: list[str]) -> EnsembleConfig:
    """The `ensemble:` settings: each key from the command line, else the members' experiment
    files when they all agree, else the competition's (with a note naming the disagreement)."""
    explicit = {text.split("=", 1)[0].split(".", 1)[1] for text in overrides
                if text.startswith("ensemble.") and "=" in text}
    values = config.ensemble.model_dump()
    for key in values:
        if key in explicit or key == "refit_weight":  # the refit weight is per member
            continue
        theirs = {json.dumps(m.ensemble.model_dump()[key]) for m in members}
        if len(theirs) == 1:
            values[key] = members[0].ensemble.model_dump()[key]
        elif key != "name":
            warn(f"the members' experiment files disagree on ensemble.{key}: "
                 f"{sorted(theirs)}; using {values[key]!r} (ARGS=ensemble.{key}=... chooses)")
    if len(members) > 1 and "name" not in explicit:
        values["name"] = config.ensemble.name
    return EnsembleConfig(**values)


def submission_name(settings: EnsembleConfig, models: list[str], cv_score: float,
                    partial: bool = False) -> str:
    if settings.name:
        return settings.name
    return f"{'+'.join(models)}{'_partial' if partial else ''}_cv{cv_score:.4f}"


def _score_columns(metric: str) -> list[str]:
    return [metric] + (["accuracy"] if metric != "accuracy" else [])


def _scores(metric: str, targets: np.ndarray, probs: np.ndarray, positive: int = 1) -> list[float]:
    return [score(m, targets, probs, positive) for m in _score_columns(metric)]


def _label_scores(metric: str, targets: np.ndarray, labels: np.ndarray,
                  n_classes: int, positive: int = 1) -> list[float]:
    return [score_labels(m, targets, labels, n_classes, positive) for m in _score_columns(metric)]


def _weight_cell(weights: np.ndarray | None, index: int) -> float | str:
    return "-" if weights is None else float(weights[index])


def score_rows(members: list[Member], oof_stack: np.ndarray, combined: Combined,
               decoded: Decoded | None, targets: np.ndarray, metric: str, method: str,
               positive: int = 1) -> list[list]:
    """One row per member and for the ensemble, all scored on the same OOF rows (`oof_stack`,
    (M, N, C)); what was fitted on those rows is scored out of fold (nested), and its in-sample
    figure is shown beside it, labelled as such."""
    rows = []
    for i, m in enumerate(members):
        refit = "yes (unvalidated)" if m.refit else "no"
        rows.append([m.name, m.oof_source, m.n_folds, refit,
                     _weight_cell(combined.weights, i),
                     *_scores(metric, targets, oof_stack[i], positive)])
    fitted = method == "fitted" and combined.oof_nested is not combined.oof
    label = f"ensemble ({method}{', weights nested' if fitted else ''})"
    rows.append([label, "", "", "", "", *_scores(metric, targets, combined.oof_nested, positive)])
    if fitted:
        rows.append([f"ensemble ({method}), in sample", "", "", "", "",
                     *_scores(metric, targets, combined.oof, positive)])
    if decoded is not None and decoded.used:
        what = "thresholds" if decoded.kind == "thresholds" else "cut-off"
        n = combined.oof.shape[1]
        rows.append([f"ensemble + {what}, out of fold (nested)", "", "", "", "",
                     *_label_scores(metric, targets, decoded.nested_labels, n, positive)])
        rows.append([f"ensemble + {what}, in sample", "", "", "", "",
                     *_label_scores(metric, targets, decoded.oof_labels, n, positive)])
    return rows


def ensemble_runs(config: Config, models: list[str] | None = None, partial: bool = False,
                  overrides: list[str] | tuple[str, ...] = ()) -> EnsembleOutcome:
    """Ensemble the current runs' probability files, write the submission, its report and,
    last, its manifest."""
    from pipeline.predict import read_test_set

    _check_decode(config, config.ensemble)  # before any reading: a wrong setting fails fast
    folds = read_folds(config)
    test_ids, test_fingerprint = read_test_set(config.data)
    explicit_refit = any(t.startswith("ensemble.refit_weight=") for t in overrides)
    checks, left_out = select_members(config, models, folds, test_fingerprint, partial,
                                      config.ensemble.refit_weight if explicit_refit else None)
    settings = ensemble_settings(config, [c.config for c in checks], list(overrides))
    _check_decode(config, settings)
    classes, metric = config.data.classes, config.data.metric
    members = [load_member(c, folds, classes, config.ensemble.refit_weight if explicit_refit
                           else c.config.ensemble.refit_weight) for c in checks]
    if settings.seeds == "average":
        members = average_seeds(members, [seed_family(c.config) for c in checks])
    is_partial = any(m.missing_folds for m in members)
    check_members_agree(members, partial=is_partial)
    oof_ids, oof_stack, test_stack = stack_members(members)
    targets = folds.set_index("id").loc[oof_ids, "target"].to_numpy(np.int64)

    method = settings.method
    positive = config.data.positive_index if len(classes) == 2 else 1
    row_folds = folds.set_index("id").loc[oof_ids, "fold"].to_numpy()
    combined = combine_members(oof_stack, test_stack, targets, method, metric, row_folds, positive)
    combined.notes += left_out
    if is_partial:
        combined.notes.append(
            "PARTIAL: " + "; ".join(f"{m.name} lacks fold(s) {m.missing_folds}" for m in members
                                    if m.missing_folds)
            + f"; the CV covers {len(oof_ids)} of {len(folds)} labelled rows")
    decoded = decode(config, settings, combined, targets, row_folds, positive)
    scores = honest_scores(metric, targets, combined, decoded, len(classes), positive)
    predictions = decoded.test_labels if decoded is not None and decoded.used else combined.test
    if any(m.refit for m in members):
        combined.notes.append("the full-data refit joined the test average unvalidated: no fold "
                              "scored it, so the CV above does not include it")

    names = [m.name.replace(" + ", "+") for m in members]
    cv_score = scores["out of fold"]
    name = submission_name(settings, names, cv_score, is_partial)
    submissions = config.submissions_path
    frame = build_submission(config.data, members[0].test_ids, predictions)
    csv_path = write_submission(frame, submissions / f"{name}.csv", config.data)
    solution_score = score_against_solution(config.data, frame)

    rows = score_rows(members, oof_stack, combined, decoded, targets, metric, method, positive)
    headers = ["model", "oof", "folds", "refit", "weight",
               *(f"oof {m}" for m in _score_columns(metric))]
    details = _details(config, settings, names, combined, decoded, csv_path, scores,
                       solution_score)
    print(format_table(rows, headers))
    for note in combined.notes:
        print(f"note: {note}")
    print(format_table([row for row in details if not row[0].startswith("test ")],
                       ["ensemble", "value"]))
    if solution_score is not None:
        print(f"test {metric} vs {config.data.solution_csv}: {solution_score:.4f}")
    report_path = submissions / f"{name}.md"
    write_text_atomic(report_path, _markdown_report(name, rows, headers, details, combined.notes))
    write_manifest(csv_path.with_suffix(".manifest.json"), "ensemble",
                   {"members": member_fingerprint(checks, settings)}, [csv_path, report_path],
                   recipe(config, checks, members, settings, combined, decoded, scores,
                          is_partial, refit_weights={c.name: (
                              (config.ensemble.refit_weight if explicit_refit
                               else c.config.ensemble.refit_weight) if c.refit else 0.0)
                              for c in checks}))
    print(f"wrote {csv_path} and {report_path}")
    return EnsembleOutcome(name=name, submission=csv_path, report=report_path, cv_score=cv_score,
                           solution_score=solution_score)


def decode(config: Config, settings: EnsembleConfig, combined: Combined, targets: np.ndarray,
           row_folds: np.ndarray, positive: int) -> Decoded | None:
    """The fitted decoder of `ensemble.decode` (auto: thresholds for an ordinal label submission,
    a cut-off for a binary one scored by an F1 metric), judged by its nested score."""
    kind = decoder_kind(config.data, settings.decode)
    if kind == "thresholds":
        decoded = decode_thresholds(combined.oof, combined.test, targets, row_folds,
                                    combined.oof_nested)
    elif kind == "cutoff":
        decoded = decode_cutoff(combined.oof, combined.test, targets, config.data.metric,
                                positive, row_folds, combined.oof_nested)
    else:
        return None
    what = "thresholds" if kind == "thresholds" else f"a cut-off of {decoded.params[0]:.3f}"
    if not decoded.used:
        combined.notes.append(
            f"{what} scored {config.data.metric} {decoded.score_nested:.4f} out of fold (each fold "
            f"decoded by a fit on the others), not above argmax's {decoded.score_argmax:.4f}: "
            f"argmax used")
    return decoded


def honest_scores(metric: str, targets: np.ndarray, combined: Combined, decoded: Decoded | None,
                  n_classes: int, positive: int) -> dict[str, float]:
    """{'out of fold': the honest CV, 'in sample': the figure fitted on the rows it scores}.

    The honest CV scores each fold with whatever was fitted (weights, thresholds, cut-off) on the
    other folds only; it is the number in the submission's name.
    """
    if decoded is not None and decoded.used:
        return {"out of fold": decoded.score_nested, "in sample": decoded.score_in_sample}
    return {"out of fold": score(metric, targets, combined.oof_nested, positive),
            "in sample": score(metric, targets, combined.oof, positive)}


def recipe(config: Config, checks: list[MemberCheck], members: list[Member],
           settings: EnsembleConfig, combined: Combined, decoded: Decoded | None,
           scores: dict[str, float], partial: bool, refit_weights: dict[str, float]) -> dict:
    """What made the submission, in the ensemble manifest's `details`: enough to repeat it from
    the members' checkpoints alone (the offline bundle reads these keys)."""
    decoding = {"kind": "argmax", "thresholds": None, "cutoff": None,
                "positive": config.data.positive_index if len(config.data.classes) == 2 else 1}
    if decoded is not None and decoded.used:
        decoding["kind"] = decoded.kind
        key = "thresholds" if decoded.kind == "thresholds" else "cutoff"
        decoding[key] = (decoded.params.tolist() if key == "thresholds"
                         else float(decoded.params[0]))
    return {
        "members": [c.name for c in checks],
        "groups": [m.name.split(" + ") for m in members],
        "folds": {c.name: c.folds for c in checks},
        "refit_weights": refit_weights,
        # the TTA each experiment's predictions were made with (chosen at predict time)
        "tta": {c.name: next(iter(member_ttas(c.config.run_dir, c.folds, c.refit).values()),
                             c.config.tta).model_dump() for c in checks},
        "refit": [m.name for m in members if m.refit],
        "method": settings.method,
        "weights": None if combined.weights is None else combined.weights.tolist(),
        "decode": decoding,
        "submission_kind": resolved_submission_kind(config.data),
        "partial": partial,
        "metric": config.data.metric,
        "cv": scores["out of fold"],
        "cv_in_sample": scores["in sample"],
        "settings": settings.model_dump(),
    }


def member_fingerprint(checks: list[MemberCheck], settings: EnsembleConfig) -> str:
    """The ensemble's input: every member prediction it read (by its manifest) and its settings."""
    manifests = {}
    for check in checks:
        run_dir = check.config.run_dir
        for k in check.folds:
            manifests[f"{check.name}/fold{k}"] = (run_dir / f"fold{k}" / "predict.manifest.json").read_text()
        if check.refit:
            manifests[f"{check.name}/full"] = (run_dir / "full" / "predict.manifest.json").read_text()
    return fingerprint([manifests, settings.model_dump()])


def submission_freshness(config: Config, manifest_file: Path) -> Freshness:
    """Whether a submission still reflects its members as they are now (for `make runs`)."""
    from pipeline.predict import read_test_set

    manifest = read_manifest(manifest_file)
    if manifest is None:
        return Freshness("missing", ["no manifest"])
    if manifest.stage != "ensemble":
        return freshness(manifest_file, manifest.inputs)  # e.g. a refit's own submission
    try:
        folds = read_folds(config)
        _, test_fingerprint = read_test_set(config.data)
        settings = EnsembleConfig(**manifest.details.get("settings", {}))
        checks = [check_member(n, config, folds, test_fingerprint, None)
                  for n in manifest.details.get("members", [])]
    except (PipelineError, ValueError) as err:
        return Freshness("stale", [str(err)])
    problems = [f"{c.name}: {p}" for c in checks for p in c.problems]
    if problems:
        return Freshness("stale", problems, manifest)
    return freshness(manifest_file, {"members": member_fingerprint(checks, settings)})


def kaggle_command(config: Config, names: list[str], csv_path: Path, cv_score: float) -> str:
    return (f'kaggle competitions submit -c {config.data.name} -f {csv_path} '
            f'-m "{"+".join(names)} cv={cv_score:.4f}"')


def _details(config: Config, settings: EnsembleConfig, names: list[str], combined: Combined,
             decoded: Decoded | None, csv_path: Path, scores: dict[str, float],
             solution_score: float | None) -> list[list[str]]:
    metric = config.data.metric
    weights = (f"none ({settings.method} is unweighted)" if combined.weights is None else
               ", ".join(f"{n} {w:.3f}" for n, w in zip(names, combined.weights)))
    direction = "higher" if higher_is_better(metric) else "lower"
    cv_score = scores["out of fold"]
    rows = [["method", settings.method], ["weights", weights], ["decode", settings.decode],
            [f"CV {metric}, out of fold ({direction} is better)", f"{cv_score:.4f}"]]
    fitted = abs(scores["in sample"] - cv_score) > 1e-12
    rows.append([f"CV {metric}, in sample", f"{scores['in sample']:.4f} " + (
        "(weights/thresholds/cut-off fitted on the rows it scores: optimistic)" if fitted
        else "(nothing fitted on the OOF rows: the same)")])
    if decoded is not None:
        what = "thresholds" if decoded.kind == "thresholds" else "cut-off"
        rows.append([f"out of fold: argmax vs {what} (nested)",
                     f"{decoded.score_argmax:.4f} vs {decoded.score_nested:.4f}"
                     + ("" if decoded.used else f"; {what} not used")])
        rows.append([what, ", ".join(f"{t:.3f}" for t in decoded.params)])
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
    ensemble_runs(config, parse_models(args.models), partial=getattr(args, "partial", False),
                  overrides=args.overrides)
