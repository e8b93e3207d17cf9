"""Average folds and models into one submission; reads only the probability files.

    python -m pipeline ensemble --data digits [--models "resnet18 timm-resnet50"] [ensemble.method=fitted]
    make ensemble [MODELS="a b"] [PARTIAL=1] [ARGS="ensemble.method=fitted"]

Per experiment (a member, pipeline/ensembling/members.py):
  - OOF  = its folds' `oof_tta.csv` (or `oof.csv` where a fold has no TTA file), concatenated and put
           in fold-file order. Every fold file must hold exactly the ids the fold file gives that
           fold, so OOF predictions made on a different split cannot leak into the score.
  - test = the mean of its folds' `test_probs.csv`; a full-data refit joins with weight
           `ensemble.refit_weight` (the folds together weigh 1).
Across members, `ensemble.method` (mean, median, trimmed, rank, fitted, hillclimb, stack, auto:
pipeline/ensembling/combine.py),
then the decoding: thresholds on the expected grade for an ordinal QWK label submission, a
cut-off for a binary F1 one (`ensemble.decode`, pipeline/ensembling/decode.py). Whatever is fitted on the OOF
rows is scored nested (fitted on the other folds, applied to the held one); that score names the
file, and the in-sample one is shown beside it, labelled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.base.config import (
    Config,
    DataConfig,
    EnsembleConfig,
    load_config,
    parse_models,
)
from pipeline.base.log import log
from pipeline.base.metrics import higher_is_better
from pipeline.base.task import Scorer
from pipeline.base.utils import format_table, make_command, markdown_table, warn, write_text_atomic
from pipeline.ensembling.combine import (
    Combined,
    Fit,
    Options,
    combine_members,
    decode_combined,
    fold_spread,
    honest_without,
)
from pipeline.ensembling.decode import Decoded, decoder_kind
from pipeline.ensembling.members import (
    Candidate,
    EnsembleError,
    Member,
    average_seeds,
    check_members_agree,
    choose_view,
    load_member,
    seed_family,
    select_members,
    stack_members,
)
from pipeline.ensembling.submission import (
    build_submission,
    resolved_submission_kind,
    score_against_solution,
    write_submission,
)
from pipeline.experiments.freshness import read_folds, read_test_set
from pipeline.experiments.layout import PUBLIC_LEADERBOARD, Layout
from pipeline.experiments.leaderboard import report_line, transfer_cautions
from pipeline.experiments.runner import Step, run_step, stage_lock
from pipeline.experiments.state import member_fingerprint


@dataclass
class EnsembleOutcome:
    """What `ensemble_runs` wrote, for the demo."""

    name: str
    submission: Path
    report: Path
    cv_score: float
    solution_score: float | None


@dataclass
class Ensemble:
    """An ensemble made: its members, how they were combined and decoded, its honest scores."""

    candidates: list[Candidate]
    members: list[Member]
    settings: EnsembleConfig
    oof_stack: np.ndarray  # (M, N_oof, C)
    targets: np.ndarray  # (N_oof,)
    combined: Combined
    decoded: Decoded | None
    scores: dict[str, float]  # out of fold (nested) and in sample
    fold_spread: float  # the nested CV's standard deviation over the folds (NaN: one fold)
    partial: bool
    n_folds: int  # the folds the OOF rows come from (one: nothing can be nested)

    @property
    def names(self) -> list[str]:
        return [m.name.replace(" + ", "+") for m in self.members]

    @property
    def predictions(self) -> np.ndarray:
        """What the submission holds: decoded labels, or the combined probabilities."""
        used = self.decoded is not None and self.decoded.used
        return self.decoded.test_labels if used else self.combined.test


# --------------------------------------------------------------------------------------------
# Settings


def check_method(data: DataConfig, settings: EnsembleConfig) -> None:
    if settings.method == "stack" and settings.stacker == "ridge" and not data.ordinal:
        raise EnsembleError(f"ensemble.stacker=ridge regresses the grade of ordinal classes; "
                            f"{data.name} has data.ordinal: false. Use ensemble.stacker=logreg")


def check_decode(data: DataConfig, settings: EnsembleConfig) -> None:
    kind = None if settings.decode in ("auto", "argmax") else resolved_submission_kind(data)
    if settings.decode == "cutoff" and (len(data.classes) != 2 or kind != "label"):
        raise EnsembleError(f"ensemble.decode=cutoff makes binary labels; {data.name} has "
                            f"{len(data.classes)} classes and a {kind} submission. Use "
                            f"ensemble.decode=auto")
    if settings.decode != "thresholds":
        return
    if not data.ordinal:
        raise EnsembleError(f"ensemble.decode=thresholds needs ordinal classes; {data.name} "
                            f"has data.ordinal: false. Use ensemble.decode=argmax")
    if kind != "label":
        raise EnsembleError(f"ensemble.decode=thresholds makes labels, but {data.name} "
                            f"takes probabilities (data.submission); use ensemble.decode=argmax")


def explicit_keys(overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The ensemble.* keys set on the command line."""
    return {text.split("=", 1)[0].split(".", 1)[1] for text in overrides
            if text.startswith("ensemble.") and "=" in text}


def ensemble_settings(ensemble: EnsembleConfig, members: list[Config],
                      overrides: list[str] | tuple[str, ...]) -> EnsembleConfig:
    """The `ensemble:` settings: each key from the command line, else the members' experiment
    files when they all agree, else the competition's (with a note naming the disagreement)."""
    explicit = explicit_keys(overrides)
    values = ensemble.model_dump()
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
        values["name"] = ensemble.name
    return EnsembleConfig(**values)


def submission_name(settings: EnsembleConfig, models: list[str], cv_score: float,
                    partial: bool = False) -> str:
    if settings.name:
        if f"{settings.name}.csv" == PUBLIC_LEADERBOARD:
            raise EnsembleError(f"ensemble.name={settings.name}: {PUBLIC_LEADERBOARD} is the "
                                f"table of uploads and their Kaggle scores; choose another name")
        return settings.name
    return f"{'+'.join(models)}{'_partial' if partial else ''}_cv{cv_score:.4f}"


# --------------------------------------------------------------------------------------------
# Making the ensemble


def load_members(data: DataConfig, refit_weight: float | None, layout: Layout,
                 models: list[str] | None, *, partial: bool, folds: pd.DataFrame,
                 test_fingerprint: str) -> tuple[list[Candidate], list[Member], list[str]]:
    """(candidates, their members, notes on experiments left out). `refit_weight`: the one of
    the command line, None for each member's own."""
    candidates, notes = select_members(data, layout, models, folds, test_fingerprint=test_fingerprint, partial=partial,
                                       refit_weight=refit_weight)
    return candidates, [load_member(c, folds, data.classes) for c in candidates], notes


def make_ensemble(config: Config, layout: Layout, folds: pd.DataFrame, test_fingerprint: str,
                  *, models: list[str] | None, partial: bool, overrides) -> Ensemble:
    """Select, load, combine and decode the members; score it honestly."""
    refit_weight = (config.ensemble.refit_weight if "refit_weight" in explicit_keys(overrides)
                    else None)
    candidates, members, left_out = load_members(config.data, refit_weight, layout,
                                                 models, partial=partial, folds=folds, test_fingerprint=test_fingerprint)
    settings = ensemble_settings(config.ensemble, [c.config for c in candidates], overrides)
    check_decode(config.data, settings)
    check_method(config.data, settings)
    if settings.seeds == "average":
        members = average_seeds(members, [seed_family(c.config) for c in candidates])
    scorer = Scorer.of(config.data)
    kind = decoder_kind(config.data, settings.decode,
                        lambda: resolved_submission_kind(config.data))
    chosen = [choose_view(m, folds, kind, scorer) for m in members]
    members = [member for member, _ in chosen]
    is_partial = any(m.missing_folds for m in members)
    check_members_agree(members, partial=is_partial)
    oof_ids, oof_stack, test_stack = stack_members(members)
    by_id = folds.set_index("id")
    targets = by_id.loc[oof_ids, "target"].to_numpy(np.int64)
    row_folds = by_id.loc[oof_ids, "fold"].to_numpy()
    combined = combine_members(oof_stack, test_stack, targets, settings.method, scorer=scorer, row_folds=row_folds,
                               options=Options.of(settings, config.data.ordinal, kind))
    combined.notes += left_out + [note for _, note in chosen if note]
    if is_partial:
        combined.notes.append(
            "PARTIAL: " + "; ".join(f"{m.name} lacks fold(s) {m.missing_folds}" for m in members
                                    if m.missing_folds)
            + f"; the CV covers {len(oof_ids)} of {len(folds)} labelled rows")
    decoded = decode_combined(kind, combined, targets, row_folds, scorer=scorer)
    if any(m.refit for m in members):
        combined.notes.append("the full-data refit joined the test average unvalidated: no fold "
                              "scored it, so the CV above does not include it")
    searched = sorted({k for c in candidates for k in c.state.searched})
    scores, searched = honest_without(searched, row_folds, targets, combined=combined,
                                      decoded=decoded, scorer=scorer,
                                      tuned=[c.name for c in candidates if c.state.searched])
    return Ensemble(candidates, members, settings, oof_stack, targets, combined, decoded, scores,
                    fold_spread(targets, combined, decoded, row_folds, scorer=scorer,
                                skipped=searched), is_partial, len(np.unique(row_folds)))


# --------------------------------------------------------------------------------------------
# The report


def _score_columns(metric: str) -> list[str]:
    return [metric] + (["accuracy"] if metric != "accuracy" else [])


def method_label(ensemble: Ensemble) -> str:
    """The method as the report names it: `auto` says what it chose."""
    used = ensemble.combined.fit.label
    return f"auto: {used}" if ensemble.settings.method == "auto" else used


def score_rows(ensemble: Ensemble, scorer: Scorer) -> list[list]:
    """One row per member and for the ensemble, all scored on the same OOF rows; what was fitted
    on those rows is scored out of fold (nested), its in-sample figure shown beside it."""
    columns, targets = _score_columns(scorer.metric), ensemble.targets
    combined, decoded = ensemble.combined, ensemble.decoded

    def scores(probs):
        return [scorer.score(targets, probs, m) for m in columns]

    def label_scores(labels):
        return [scorer.score_labels(targets, labels, m) for m in columns]

    rows = [[m.name, m.oof_source, m.n_folds, "yes (unvalidated)" if m.refit else "no",
             "-" if combined.weights is None else float(combined.weights[i]),
             *scores(ensemble.oof_stack[i])] for i, m in enumerate(ensemble.members)]
    method = method_label(ensemble)
    if combined.fitted and combined.nested:
        rows.append([f"ensemble ({method}), out of fold (nested)", "", "", "", "",
                     *scores(combined.oof_nested)])
        rows.append([f"ensemble ({method}), in sample", "", "", "", "", *scores(combined.oof)])
    else:
        what = ", in sample: one fold, nothing to nest it in" if combined.fitted else ""
        rows.append([f"ensemble ({method}{what})", "", "", "", "", *scores(combined.oof)])
    if decoded is not None and decoded.used:
        what = "thresholds" if decoded.kind == "thresholds" else "cut-off"
        rows.append([f"ensemble + {what}, out of fold (nested)", "", "", "", "",
                     *label_scores(decoded.nested_labels)])
        rows.append([f"ensemble + {what}, in sample", "", "", "", "",
                     *label_scores(decoded.oof_labels)])
    return rows


def members_used(fit: Fit, names: list[str]) -> str:
    """Who a fitted method uses, and how: the weights above zero, or the stacker's inputs."""
    if fit.method == "stack":
        inputs = ("expected grades" if fit.stacker["kind"] == "ridge" else "log-probabilities")
        return f"all {len(names)}: {fit.stacker['kind']} on their {inputs}"
    if fit.weights is None:
        return f"all {len(names)}, unweighted"
    return ", ".join(f"{n} {w:.2f}" for n, w in zip(names, fit.weights) if w > 0)


def method_rows(ensemble: Ensemble) -> list[list]:
    """auto's table: each method with the members it uses, its nested and in-sample CV (as its
    own submission would decode them), the one used marked."""
    combined, names = ensemble.combined, ensemble.names
    rows = [[row.fit.label, members_used(row.fit, names), row.score_nested, row.score_in_sample,
             "used" if row.fit is combined.fit else ""] for row in combined.table]
    if combined.choice_nested:
        rows.append(["auto (chosen on the other folds for each held fold)", "",
                     ensemble.scores["out of fold"], "", "the CV"])
    return rows


def upload_command(data: DataConfig, csv_path: Path) -> str:
    """`make submit NAME=<this submission>`: the upload, with the CV in its message, recorded
    for `make lb` (the competition's `kaggle:` name is asked for there when it is not set)."""
    return make_command("submit", data.name, NAME=csv_path.stem)


def in_sample_note(ensemble: Ensemble) -> str:
    """What the in-sample figure is, beside the CV: the same when nothing was fitted on the OOF
    rows; optimistic when something was; the CV itself when there was one fold to nest in."""
    decoded = ensemble.decoded is not None and ensemble.decoded.used
    if not (ensemble.combined.fitted or decoded):
        return "(nothing fitted on the OOF rows: the same)"
    if ensemble.n_folds < 2:
        return ("(one fold: nothing to nest the fits in, so the CV above is this in-sample "
                "figure: optimistic)")
    return "(weights/selection/stacker/thresholds/cut-off fitted on the rows it scores: optimistic)"


def details_rows(data: DataConfig, ensemble: Ensemble, csv_path: Path,
                 solution_score: float | None) -> list[list[str]]:
    metric, settings, scores = data.metric, ensemble.settings, ensemble.scores
    combined, decoded = ensemble.combined, ensemble.decoded
    weights = members_used(combined.fit, ensemble.names)
    direction = "higher" if higher_is_better(metric) else "lower"
    cv_score = scores["out of fold"]
    rows = [["method", method_label(ensemble)], ["members used", weights],
            ["decode", settings.decode],
            [f"CV {metric}, out of fold ({direction} is better)", f"{cv_score:.4f}"]]
    rows.append([f"CV {metric}, in sample",
                 f"{scores['in sample']:.4f} {in_sample_note(ensemble)}"])
    if decoded is not None:
        what = "thresholds" if decoded.kind == "thresholds" else "cut-off"
        rows.append([f"out of fold: argmax vs {what} (nested)",
                     f"{decoded.score_argmax:.4f} vs {decoded.score_nested:.4f}"
                     + ("" if decoded.used else f"; {what} not used")])
        rows.append([what, ", ".join(f"{t:.3f}" for t in decoded.params)])
    rows.append(["submission", str(csv_path)])
    if solution_score is not None:
        rows.append([f"test {metric} vs {data.solution_csv}", f"{solution_score:.4f}"])
    rows.append(["upload", upload_command(data, csv_path)])
    return rows


METHOD_HEADERS = ["method", "members used", "CV nested", "CV in sample", ""]


def markdown_report(name: str, rows: list[list], headers: list[str], details: list[list[str]],
                    *, notes: list[str], methods: list[list]) -> str:
    lines = [f"# Submission {name}", "", markdown_table(rows, headers), ""]
    if methods:
        lines += ["## Methods (auto; each CV as that method's submission decodes it)", "",
                  markdown_table(methods, METHOD_HEADERS), ""]
    lines += [f"- **{key}**: `{value}`" if key == "upload" else f"- **{key}**: {value}"
              for key, value in details]
    lines += [f"- note: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def recipe(data: DataConfig, ensemble: Ensemble) -> dict:
    """What made the submission, in the ensemble manifest's `details`: enough to repeat it from
    the members' checkpoints alone (the offline bundle reads these keys)."""
    scorer, decoded, combined = Scorer.of(data), ensemble.decoded, ensemble.combined
    decoding = {"kind": "argmax", "thresholds": None, "cutoff": None, "positive": scorer.positive}
    if decoded is not None and decoded.used:
        decoding["kind"] = decoded.kind
        if decoded.kind == "thresholds":
            decoding["thresholds"] = decoded.params.tolist()
        else:
            decoding["cutoff"] = float(decoded.params[0])
    candidates = ensemble.candidates
    return {
        "members": [c.name for c in candidates],
        "groups": [m.name.split(" + ") for m in ensemble.members],
        "folds": {c.name: c.folds for c in candidates},
        "refit_weights": {c.name: c.used_refit_weight for c in candidates},
        # the TTA each experiment's predictions were made with (chosen at predict time)
        "tta": {c.name: c.state.tta(c.refit).model_dump() for c in candidates},
        "refit": [m.name for m in ensemble.members if m.refit],
        # what each experiment submits from: its class probabilities, or a `both` head's grade
        "views": {name: m.view for m in ensemble.members for name in m.name.split(" + ")},
        # what combines the members' test rows: the method used (auto: the one it chose), its
        # weights or its stacker's parameters (combine.apply_combination)
        "method": combined.fit.method,
        "method_label": method_label(ensemble),
        "weights": None if combined.weights is None else combined.weights.tolist(),
        "stacker": combined.fit.stacker,
        "methods": [{"method": row.fit.label, "cv": row.score_nested,
                     "cv_in_sample": row.score_in_sample} for row in combined.table],
        "decode": decoding,
        "submission_kind": resolved_submission_kind(data),
        "partial": ensemble.partial,
        "metric": data.metric,
        "cv": ensemble.scores["out of fold"],
        "cv_in_sample": ensemble.scores["in sample"],
        "cv_fold_std": ensemble.fold_spread,  # make lb: how far the public LB may drift from it
        "settings": ensemble.settings.model_dump(),
    }


# --------------------------------------------------------------------------------------------
# The stage


def write_outputs(data: DataConfig, layout: Layout, ensemble: Ensemble,
                  test_ids: list[str]) -> EnsembleOutcome:
    """The submission, its report and, last, its manifest (written again each time: it is
    cheap), all or none: a write that fails removes the others; the tables shown."""
    cv_score = ensemble.scores["out of fold"]
    submission = layout.submission(submission_name(ensemble.settings, ensemble.names, cv_score,
                                                   ensemble.partial))
    refits = {c.name: c.refit for c in ensemble.candidates}
    inputs = {"members": member_fingerprint([c.state for c in ensemble.candidates], refits,
                                            ensemble.settings)}
    cautions = transfer_cautions(layout, len(ensemble.targets))
    step = Step("ensemble", submission.manifest, inputs, recipe(data, ensemble),
                lambda: [submission.csv, submission.report],
                lambda: write_submission_files(data, ensemble, submission, test_ids,
                                               cautions=cautions),
                current="",
                all_or_none=True)  # a failed write leaves no submission without its report
    solution_score = run_step(step, force=True)
    log.info(f"wrote {submission.csv} and {submission.report}")
    log.info(report_line(layout))
    return EnsembleOutcome(submission.name, submission.csv, submission.report, cv_score,
                           solution_score)


def write_submission_files(data: DataConfig, ensemble: Ensemble, submission,
                           test_ids: list[str], *, cautions: list[str]) -> float | None:
    """The submission CSV and its markdown report, with their tables shown; the score against
    the held-out labels where the competition has them; `cautions`: why the CV beside it may
    not transfer (the audit's findings), shown and written beside the CV."""
    scorer, metric = Scorer.of(data), data.metric
    frame = build_submission(data, test_ids, ensemble.predictions)
    csv_path = write_submission(frame, submission.csv, data)
    solution_score = score_against_solution(data, frame)
    rows = score_rows(ensemble, scorer)
    headers = ["model", "oof", "folds", "refit", "weight",
               *(f"oof {m}" for m in _score_columns(metric))]
    details = details_rows(data, ensemble, csv_path, solution_score)
    log.info(format_table(rows, headers))
    methods = method_rows(ensemble) if ensemble.combined.table else []
    if methods:
        log.info(format_table(methods, METHOD_HEADERS))
    for note in ensemble.combined.notes:
        log.info(f"note: {note}")
    log.info(format_table([row for row in details if not row[0].startswith("test ")],
                          ["ensemble", "value"]))
    if solution_score is not None:
        log.info(f"test {metric} vs {data.solution_csv}: {solution_score:.4f}")
    for caution in cautions:
        warn(caution)
    write_text_atomic(submission.report, markdown_report(
        submission.name, rows, headers, details, methods=methods,
        notes=[*ensemble.combined.notes, *(f"**{c}**" for c in cautions)]))
    return solution_score


def ensemble_runs(config: Config, models: list[str] | None = None, partial: bool = False,
                  overrides: list[str] | tuple[str, ...] = ()) -> EnsembleOutcome:
    """Ensemble the current runs' probability files, write the submission, its report and,
    last, its manifest."""
    check_decode(config.data, config.ensemble)  # before any reading: a wrong setting fails fast
    check_method(config.data, config.ensemble)
    layout = Layout.of(config)
    folds = read_folds(config.data, config.folds, layout)
    _, test_fingerprint = read_test_set(config.data)
    with stage_lock(layout.submissions_lock, layout.submissions, "written"):
        ensemble = make_ensemble(config, layout, folds, test_fingerprint, models=models, partial=partial,
                                 overrides=overrides)
        return write_outputs(config.data, layout, ensemble, ensemble.members[0].test_ids)


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "models", "partial", "overrides")


def main(args) -> None:
    config = load_config(args.data, None, args.overrides)
    ensemble_runs(config, parse_models(args.models), partial=args.partial,
                  overrides=args.overrides)
