"""Every experiment of a competition and every submission, as the leaderboard shows them: read
by `make runs` (the terminal table) and `make report` (the HTML page).

    frame = leaderboard(data, folds, layout)        # one row per experiment, best first
    for s in submission_summaries(data, folds, layout): print(s.name, s.cv, s.current)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.base.config import DataConfig, FoldsConfig
from pipeline.base.metrics import higher_is_better
from pipeline.base.task import Scorer
from pipeline.base.utils import PipelineError, make_command
from pipeline.experiments.freshness import (
    folds_freshness,
    read_folds_unchecked,
    read_test_set,
)
from pipeline.experiments.layout import Layout, submission_of_manifest
from pipeline.experiments.manifests import read_manifest
from pipeline.experiments.state import (
    ExperimentState,
    cv_numbers,
    experiment_state,
    submission_freshness,
)

# budget: train.time_budget, the minutes a fold was given ("-": none); minutes: what its folds took
HEADERS = ["experiment", "model", "size", "epochs", "budget", "seed", "cv mean", "cv std", "oof",
           "oof test-like", "tta gain", "status", "minutes", "submissions"]
# When the CV may not transfer (issue 27): the audit tells test from training images apart this
# well (0.5: not at all), or this share of the labelled rows sit in duplicate groups whose labels
# disagree. Judgement, not measurement: 0.8 is where the shift is plain in the features.
SHIFT_CAUTION_AUC = 0.8
CONFLICT_CAUTION_SHARE = 0.05


def submissions_of(summaries: list[SubmissionSummary]) -> dict[str, list[str]]:
    """experiment name -> its submissions ('name' or 'name (stale)'), in the order given."""
    found: dict[str, list[str]] = {}
    for s in summaries:
        for member in s.members:
            found.setdefault(member, []).append(s.name + ("" if s.current else " (stale)"))
    return found


def competition_states(data: DataConfig, folds_cfg: FoldsConfig,
                       layout: Layout) -> list[ExperimentState]:
    """The state of every experiment of the competition (the fold file may be stale: then
    every fold is, with the reason)."""
    names = layout.experiment_names()
    if not names:
        return []
    if not layout.folds_csv.is_file():
        raise PipelineError(f"{layout.folds_csv} not found: run "
                            f"`{make_command('folds', data.name)}`")
    fresh = folds_freshness(data, folds_cfg, layout)
    folds_error = None if fresh.current else f"the folds no longer fit the data ({fresh.why()})"
    folds = read_folds_unchecked(data, layout)
    _, test_fingerprint = read_test_set(data)
    states = [experiment_state(data, layout, name, folds, test_fingerprint=test_fingerprint, folds_error=folds_error)
              for name in names]
    return [s for s in states if s is not None]


def leaderboard(data: DataConfig, folds_cfg: FoldsConfig, layout: Layout,
                states: list[ExperimentState] | None = None, *,
                summaries: list[SubmissionSummary] | None = None) -> pd.DataFrame:
    """One row per experiment (HEADERS), best out-of-fold score first; `states`, `summaries`
    (read_submissions): what the caller has already (each submission's freshness judges its
    members' folds again: worth asking once per command)."""
    states = competition_states(data, folds_cfg, layout) if states is None else states
    if summaries is None and states:
        summaries = read_submissions(data, folds_cfg, layout)
    submissions = submissions_of(summaries) if states else {}
    test_like = test_like_ids(layout)
    rows = []
    for state in states:
        c = state.config
        numbers = cv_numbers(state, Scorer.of(c.data), test_like)
        budget = "-" if c.train.time_budget is None else f"{c.train.time_budget:g} min/fold"
        rows.append([state.name, c.model.name, c.augment.image_size, c.train.epochs, budget,
                     c.train.seed,
                     numbers["cv_mean"], numbers["cv_std"], numbers["oof"],
                     numbers["oof_test_like"], numbers["tta_gain"],
                     state.status(), numbers["minutes"],
                     ", ".join(submissions.get(state.name, [])) or "-"])
    frame = pd.DataFrame(rows, columns=HEADERS)
    return frame.sort_values("oof", ascending=not higher_is_better(data.metric),
                             na_position="last", kind="stable")


def test_like_ids(layout: Layout) -> set[str]:
    """The audit's labelled rows most like the test set (test_like.csv), or none without it."""
    path = layout.findings.test_like
    if not path.is_file():
        return set()
    return set(pd.read_csv(path, dtype={"id": str}, keep_default_na=False)["id"])


def transfer_cautions(layout: Layout, labelled: int) -> list[str]:
    """Why the CV may not carry over to the leaderboard, from the audit's findings on disk
    (none without them): a test set the audit tells apart from the training set, and duplicate
    groups whose labels disagree; each with what to do."""
    findings, cautions = layout.findings, []
    if findings.shift.is_file():
        table = pd.read_csv(findings.shift)
        sets, features = table[table["what"] != "feature"], table[table["what"] == "feature"]
        if len(sets) and sets["auc"].max() >= SHIFT_CAUTION_AUC:
            worst = sets.loc[sets["auc"].idxmax()]
            top = ", ".join(f"{r.name} {r.auc:.2f}" for r in features.head(3).itertuples())
            cautions.append(
                f"the CV may not transfer: the audit tells the test images from the training "
                f"images apart (AUC {worst.auc:.2f} on {worst.what}; most: {top}). Judge the "
                f"experiments by `oof test-like` too (the out-of-fold score on the labelled "
                f"images most like the test set, {findings.test_like}), and match the test "
                f"set's preprocessing where you can")
    if findings.duplicates.is_file() and labelled:
        table = pd.read_csv(findings.duplicates, dtype=str, keep_default_na=False)
        train = table[table["part"] == "train"]
        labels = train.groupby("group")["label"].nunique()
        rows = int(train["group"].isin(labels[labels > 1].index).sum())
        if rows / labelled >= CONFLICT_CAUTION_SHARE:
            cautions.append(
                f"the CV may not transfer: {rows} labelled images ({rows / labelled:.0%}) sit in "
                f"duplicate groups whose labels disagree ({findings.duplicates}): the CV scores "
                f"a coin toss on them; "
                f"`{make_command('folds', layout.competition, ARGS='folds.duplicate_conflicts=drop')}`"
                f" (or `=majority`) splits without the contradiction, then train again")
    return cautions


@dataclass
class SubmissionSummary:
    """One submission as its manifest recorded it, and whether its members are still current."""

    name: str
    csv: Path
    members: list[str]
    method: str  # the method used (auto: the one it chose), with the stacker's kind
    cv: float  # nested: the CV beside the submission
    cv_in_sample: float
    cv_std: float  # the nested CV's spread over the folds (NaN: one fold, or an older manifest)
    current: bool
    why: str  # what changed since, when not current
    partial: bool
    methods: list[dict]  # auto: every method's nested and in-sample CV


def submission_summaries(data: DataConfig, folds: FoldsConfig,
                         layout: Layout) -> list[SubmissionSummary]:
    """Every submission of the competition with a readable manifest, best CV first."""
    return best_first(read_submissions(data, folds, layout), data.metric)


def read_submissions(data: DataConfig, folds: FoldsConfig,
                     layout: Layout) -> list[SubmissionSummary]:
    """Every submission of the competition with a readable manifest, in the order of their
    manifests' names."""
    found = []
    for path in layout.submission_manifests():
        manifest = read_manifest(path)
        if manifest is None:
            continue
        details, fresh = manifest.details, submission_freshness(data, folds, layout, path)
        method = details.get("method_label", details.get("method", "?"))
        if details.get("refit only"):
            method = "the full-data refit alone (unvalidated: no CV)"
        name = submission_of_manifest(path)
        found.append(SubmissionSummary(
            name, layout.submission(name).csv, details.get("members", []), method,
            float(details.get("cv", np.nan)), float(details.get("cv_in_sample", np.nan)),
            float(details.get("cv_fold_std", np.nan)),
            fresh.current, "" if fresh.current else fresh.why(), bool(details.get("partial")),
            details.get("methods", [])))
    return found


def best_first(summaries: list[SubmissionSummary], metric: str) -> list[SubmissionSummary]:
    sign = -1 if higher_is_better(metric) else 1
    return sorted(summaries, key=lambda s: (np.isnan(s.cv), sign * np.nan_to_num(s.cv)))


def report_line(layout: Layout) -> str:
    """Where the competition's HTML report is, and how to bring it up to date."""
    made = "" if layout.report.index.is_file() else " (not written yet)"
    return (f"report: {layout.report.index}{made}; {make_command('report', layout.competition)} "
            f"updates it")
