"""An ensemble's members: which experiments may join, and their predictions read as arrays.

    candidates, notes = select_members(data, layout, names, folds, test_fingerprint, partial,
                                       refit_weight=None)
    members = [load_member(c, folds, data.classes) for c in candidates]
    oof_ids, oof_stack, test_stack = stack_members(members)

A member is one experiment: its out-of-fold rows (every fold of the fold file, in the file's
order) and its test rows (the folds' mean, the full-data refit joined with its weight). Only
experiments whose every fold is trained and predicted under the inputs of now may join
(pipeline/experiments/freshness.py); `make ensemble` and `make pseudo` choose members here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from pipeline.base.config import Config, DataConfig, training_settings
from pipeline.base.fingerprints import fingerprint
from pipeline.base.task import Scorer
from pipeline.base.utils import PipelineError, make_command, summarize_offenders
from pipeline.ensembling.combine import (
    GRADE_VIEW,
    PROBS_VIEW,
    choose_views,
    fold_mean_with_refit,
)
from pipeline.ensembling.decode import grade_to_probs
from pipeline.experiments.layout import Layout
from pipeline.experiments.probfiles import GRADE, aligned_test, read_fold_oof
from pipeline.experiments.state import (
    ExperimentState,
    experiment_config,
    experiment_state,
)


class EnsembleError(PipelineError):
    """The runs cannot be ensembled; the message names the run, file and remedy."""


@dataclass(frozen=True)
class Member:
    """One experiment's predictions, ready to combine."""

    name: str
    oof_ids: list[str]  # in fold-file order
    oof: np.ndarray  # (N_oof, C) probabilities, rows of oof_ids
    test_ids: list[str]  # test-id order of the first fold
    test: np.ndarray  # (N_test, C) folds' mean, with the refit joined
    oof_source: str  # which OOF files were used: oof_tta, oof, or both by fold
    n_folds: int
    refit: bool  # whether the refit's test predictions joined the test average
    missing_folds: list[int] = field(default_factory=list)  # --partial: folds not trained
    # a `both` head: its grade output's OOF and test rows, as two-point distributions
    grade_oof: np.ndarray | None = None
    grade_test: np.ndarray | None = None
    view: str = PROBS_VIEW  # what oof and test hold: PROBS_VIEW, or GRADE_VIEW (choose_view)


@dataclass
class Candidate:
    """An experiment considered for the ensemble: its state, whether its refit joins, and what
    keeps it out (each problem with its remedy)."""

    state: ExperimentState
    refit_weight: float
    problems: list[str]

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def config(self) -> Config:
        return self.state.config

    @property
    def folds(self) -> list[int]:
        return self.state.predicted_folds

    @property
    def refit(self) -> bool:
        return self.refit_weight > 0 and self.state.refit_current

    @property
    def used_refit_weight(self) -> float:
        return self.refit_weight if self.refit else 0.0


def candidate(data: DataConfig, layout: Layout, name: str, folds: pd.DataFrame,
              *, test_fingerprint: str, refit_weight: float | None, partial: bool) -> Candidate:
    """Experiment `name` judged as a member: `refit_weight` None takes its own
    ensemble.refit_weight; `partial` allows missing folds when it has some."""
    saved = experiment_config(layout.experiment(name))
    if saved is None:
        raise EnsembleError(f"{layout.experiment(name).dir} is no experiment of "
                            f"{layout.competition}: run "
                            f"`{make_command('train', layout.competition, MODEL=name)}`")
    weight = saved.ensemble.refit_weight if refit_weight is None else refit_weight
    state = experiment_state(data, layout, name, folds, test_fingerprint=test_fingerprint, with_refit=weight > 0)
    problems = state.problems(use_refit=weight > 0)
    missing, usable = state.missing_folds, state.predicted_folds
    if missing and not (partial and usable):
        what = "no fold" if not usable else f"fold(s) {missing} of the fold file"
        problems.append(f"{what} trained: "
                        f"`{make_command('train predict', layout.competition, MODEL=name)}`"
                        + ("" if not usable else " (or PARTIAL=1 to ensemble the folds it has)"))
    return Candidate(state, weight, problems)


def select_members(data: DataConfig, layout: Layout, names: list[str] | None,
                   folds: pd.DataFrame, *, test_fingerprint: str, partial: bool,
                   refit_weight: float | None) -> tuple[list[Candidate], list[str]]:
    """The members to ensemble and notes on the experiments left out.

    Named members (MODELS=) must be current and complete (with `partial`, folds may be missing,
    never stale); any other is refused with what is wrong and the remedy. Without names, every
    current and complete experiment of the competition is used and the others are listed.
    """
    found = layout.experiment_names()
    _check_names(layout, names, found)
    candidates = [candidate(data, layout, name, folds, test_fingerprint=test_fingerprint, refit_weight=refit_weight, partial=partial)
                  for name in (names or found)]
    if names is not None:
        refused = [c for c in candidates if c.problems]
        if refused:
            raise EnsembleError("cannot ensemble:\n" + "\n".join(
                f"  {c.name}: " + "\n    ".join(c.problems) for c in refused))
        return candidates, []
    usable = [c for c in candidates if not c.problems]
    notes = [f"left out {c.name}: {'; '.join(c.problems)}" for c in candidates if c.problems]
    if not usable:
        raise EnsembleError(f"no experiment of {layout.competition} is current and complete:\n  "
                            + "\n  ".join(notes)
                            + f"\n(`{make_command('runs', layout.competition)}` shows every "
                            f"experiment)")
    return usable, notes


def _check_names(layout: Layout, names: list[str] | None, found: list[str]) -> None:
    competition = layout.competition
    if names is None:
        if not found:
            remedy = make_command("train predict", competition, MODEL="<model>")
            raise EnsembleError(f"no experiment of {competition} in {layout.runs}/: run "
                                f"`{remedy}`")
        return
    if len(set(names)) != len(names):
        raise EnsembleError(f"MODELS names a run twice: {names}")
    unknown = [m for m in names if m not in found]
    if unknown:
        raise EnsembleError(f"no experiment {', '.join(unknown)} of {competition} in "
                            f"{layout.runs}/: run "
                            f"`{make_command('train predict', competition, MODEL='<name>')}` "
                            f"first; experiments of {competition}: "
                            f"{found or 'none'}")


def _describe_sources(sources: dict[int, str]) -> str:
    kinds = sorted(set(sources.values()))
    if len(kinds) == 1:
        return kinds[0]
    return ", ".join(f"{kind} (fold {','.join(str(k) for k, v in sources.items() if v == kind)})"
                     for kind in kinds)


def load_member(member: Candidate, folds: pd.DataFrame, classes: list[str]) -> Member:
    """One experiment's OOF (fold-file order) and test average (folds weigh 1, its refit
    `member.used_refit_weight`), from the folds its state found current; with a `both` head
    also its grade output's (as two-point distributions), for the ensemble to choose from."""
    exp, grade = member.state.exp, member.config.model.head == "both"
    columns = [*classes, GRADE] if grade else list(classes)
    parts, sources, test_ids, tests = [], {}, None, []
    for k in member.folds:
        oof, sources[k] = read_fold_oof(exp.fold(k), k, folds, classes, with_grade=grade)
        parts.append(oof)
        test_ids, probs = aligned_test(exp.fold(k).test_probs, classes, test_ids, columns)
        tests.append(probs)
    if member.refit:
        refit = aligned_test(exp.refit.test_probs, classes, test_ids, columns)[1]
    views = _views(tests, refit if member.refit else None, member.used_refit_weight, grade)
    oof = pd.concat(parts).set_index("id")
    order = [i for i in folds["id"] if i in oof.index]  # fold-file order
    n = len(classes)
    return Member(name=member.name, oof_ids=order,
                  oof=oof.loc[order, list(classes)].to_numpy(np.float64), test_ids=test_ids,
                  test=views[0], oof_source=_describe_sources(sources), n_folds=len(member.folds),
                  refit=member.refit, missing_folds=list(member.state.missing_folds),
                  grade_oof=grade_to_probs(oof.loc[order, GRADE].to_numpy(np.float64), n)
                  if grade else None, grade_test=views[1])


def _views(tests: list[np.ndarray], refit: np.ndarray | None, weight: float,
           grade: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(test probabilities, grade view or None): each the folds' mean with the refit joined;
    the grade view of the grade column as two-point distributions."""
    n = tests[0].shape[1] - (1 if grade else 0)
    probs = fold_mean_with_refit([t[:, :n] for t in tests],
                                 None if refit is None else refit[:, :n], weight)
    if not grade:
        return probs, None
    as_probs = [grade_to_probs(t[:, n], n) for t in tests]
    refit_probs = None if refit is None else grade_to_probs(refit[:, n], n)
    return probs, fold_mean_with_refit(as_probs, refit_probs, weight)


def choose_view(member: Member, folds: pd.DataFrame, kind: str,
                scorer: Scorer) -> tuple[Member, str | None]:
    """A `both` member submits from its class probabilities or its grade output, whichever
    scores better on the other folds (combine.choose_views); returns it with that view as its
    predictions, and a note saying which and by how much."""
    if member.grade_oof is None:
        return member, None
    by_id = folds.set_index("id")
    targets = by_id.loc[member.oof_ids, "target"].to_numpy(np.int64)
    row_folds = by_id.loc[member.oof_ids, "fold"].to_numpy()
    choice = choose_views({PROBS_VIEW: (member.oof, member.test),
                           GRADE_VIEW: (member.grade_oof, member.grade_test)},
                          targets, row_folds, kind, scorer=scorer)
    scores = ", ".join(f"{view} {value:.4f}" for view, value in choice.nested.items())
    agreed = sum(v == choice.view for v in choice.per_fold)
    note = (f"{member.name} submits from its {choice.view} (chosen on the other folds for "
            f"{agreed} of {len(choice.per_fold)} folds; {scorer.metric} out of fold: {scores})")
    return replace(member, oof=choice.oof, test=choice.test, view=choice.view), note


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
    return [group[0] if len(group) == 1 else _mean_member(group) for group in grouped.values()]


def covered_ids(members: list[Member]) -> list[str]:
    """The OOF ids every member covers, in the first member's order: one set intersection,
    linear in the ids (a set rebuilt per id made seed averaging quadratic: 7.5 s at 16,000)."""
    covered = set.intersection(*(set(m.oof_ids) for m in members))
    return [i for i in members[0].oof_ids if i in covered]


def _mean_member(group: list[Member]) -> Member:
    """Seeds of one family as one member: their OOF rows averaged by id over the ids they all
    cover, their test rows by id in the first member's test order."""
    test_ids, common = group[0].test_ids, covered_ids(group)

    def mean_of(oofs, tests):
        return (np.mean([o[pd.Index(m.oof_ids).get_indexer(common)] for o, m in zip(oofs, group)],
                        axis=0),
                np.mean([t[pd.Index(m.test_ids).get_indexer(test_ids)]
                         for t, m in zip(tests, group)], axis=0))

    oof, test = mean_of([m.oof for m in group], [m.test for m in group])
    graded = all(m.grade_oof is not None for m in group)
    grade_oof, grade_test = (mean_of([m.grade_oof for m in group], [m.grade_test for m in group])
                             if graded else (None, None))
    return Member(name=" + ".join(m.name for m in group), oof_ids=common, oof=oof,
                  test_ids=test_ids, test=test, oof_source=group[0].oof_source,
                  n_folds=min(m.n_folds for m in group), refit=any(m.refit for m in group),
                  missing_folds=sorted({k for m in group for k in m.missing_folds}),
                  grade_oof=grade_oof, grade_test=grade_test)


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
    ids, test_ids = covered_ids(members), members[0].test_ids
    oof = np.stack([m.oof[pd.Index(m.oof_ids).get_indexer(ids)] for m in members])
    test = np.stack([m.test[pd.Index(m.test_ids).get_indexer(test_ids)] for m in members])
    return ids, oof, test
