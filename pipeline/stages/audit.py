"""Trust the data before the CV: duplicates, train/test shift and wrong labels.

    python -m pipeline audit --data retina [--model resnet50]     # make audit [MODEL=resnet50]

Writes audit/<competition>/, each finding with its manifest (current or stale by the one
freshness rule, pipeline/experiments/freshness.py; a current finding is not computed again).
Before a finding is computed, its images are checked as `make check` and `make folds` check
them: a missing, unreadable or oversized image is an error naming it; with
data.drop_bad_images=true bad training images are left out and listed.

- duplicates.csv|png: groups of exact copies (the same bytes) and near copies (a shifted,
  cropped, rotated, rescaled, re-encoded, brightened or noisier
  copy, found by aligned thumbnails with a cut from the competition's own images: pipeline/
  data/duplicates.py), within the labelled rows and between labelled and test rows;
  groups whose labels disagree, test images with a labelled copy. `make folds` then keeps each
  group in one fold (folds.duplicates; folds.duplicate_conflicts=drop|majority for the
  conflicting ones), and the folds' fingerprint includes the groups. The picture shows the
  first audit.shown groups, a row of at most GROUP_IMAGES each ("+N more").
- shift.csv, test_like.csv: adversarial validation: a classifier told to tell training from
  test images, cross-validated, on cheap features of each image (size, aspect, file size, JPEG
  quality, colour, sharpness) and, with MODEL=, on the model's pooled features. Its AUC (0.5:
  the test set looks like the training set), the features that separate most, and the training
  images that look most like test images (a validation subset that resembles the leaderboard).
- label_issues_<experiment>.csv|png (MODEL=): the rows whose out-of-fold probabilities
  contradict their label most, by confident learning (cleanlab.filter.find_label_issues),
  ranked, with the given and the predicted label. `ARGS=train.exclude=<that file>` trains a new
  experiment without them (they stay in validation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from pipeline.base.config import Config, DataConfig, load_config
from pipeline.base.fingerprints import fingerprint
from pipeline.base.log import log
from pipeline.base.metrics import higher_is_better
from pipeline.base.task import Scorer
from pipeline.base.utils import (
    PipelineError,
    format_table,
    make_command,
    summarize_offenders,
    warn,
    write_csv_atomic,
)
from pipeline.data.duplicates import conflicts
from pipeline.data.survey import FEATURES
from pipeline.experiments.findings import AuditedImages, duplicates_finding, run_finding
from pipeline.experiments.freshness import read_folds, read_test_set
from pipeline.experiments.layout import Layout
from pipeline.experiments.probfiles import oof_file, read_probs
from pipeline.experiments.runner import stage_lock
from pipeline.experiments.state import experiment_state, label_issue_inputs, load_experiment
from pipeline.inference.predictor import pooled_features
from pipeline.reporting import plots

# --------------------------------------------------------------------------------------------
# Duplicates (the finding itself: pipeline/experiments/findings.py, shared with `make folds`)


def duplicates_summary(table: pd.DataFrame) -> list[list]:
    """Rows of the duplicates table printed at the end of the audit."""
    if table.empty:
        return [["duplicate groups", 0]]
    by_group = table.groupby("group")["part"].agg(set)
    mixed = int(by_group.map(lambda parts: parts == {"train", "test"}).sum())
    test_with_copy = table[(table["part"] == "test")
                           & table["group"].isin(by_group[by_group.map(len) > 1].index)]
    found = conflicts(table)
    return [["duplicate groups", len(by_group)], ["images in them", len(table)],
            ["groups holding labelled and test images", mixed],
            ["test images with a labelled copy", len(test_with_copy)],
            ["groups with conflicting labels", len(found)]]


def audit_duplicates(config: Config, layout: Layout, images: AuditedImages,
                     force: bool) -> list[list]:
    table = duplicates_finding(config, layout, images, force)
    found = conflicts(table) if not table.empty else []
    if len(found):
        log.info(f"duplicate groups with conflicting labels: "
                 f"{summarize_offenders([f'{g} {ls}' for g, ls in zip(found.group, found.labels)])}")
    return duplicates_summary(table)


# --------------------------------------------------------------------------------------------
# Train/test shift


def shift_auc(features: np.ndarray, is_test: np.ndarray, folds: int,
              model) -> tuple[float, float, np.ndarray]:
    """(mean AUC, its std over the folds, out-of-fold P(test) per image) of `model` telling
    test from training images."""
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    scores, p_test = [], np.zeros(len(is_test))
    for train, held in split.split(features, is_test):
        fitted = model.fit(features[train], is_test[train])
        p_test[held] = fitted.predict_proba(features[held])[:, 1]
        scores.append(roc_auc_score(is_test[held], p_test[held]))
    return float(np.mean(scores)), float(np.std(scores)), p_test


def feature_separation(features: np.ndarray, is_test: np.ndarray) -> list[list]:
    """Each cheap feature's own AUC (how far from 0.5), most separating first."""
    rows = []
    for name, column in zip(FEATURES, features.T):
        auc = roc_auc_score(is_test, column) if np.ptp(column) > 0 else 0.5
        rows.append([name, round(max(auc, 1 - auc), 4)])
    return sorted(rows, key=lambda r: -r[1])


def shift_tables(images: AuditedImages, config: Config, experiment: Config | None, *,
                 layout: Layout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(shift.csv: AUC per feature set and per feature; test_like.csv)."""
    (frame, paths), features = images.usable, images.survey.features  # read by the check
    is_test = (frame["part"] == "test").to_numpy().astype(int)
    gbm = HistGradientBoostingClassifier(max_iter=100, random_state=0)
    auc, std, p_test = shift_auc(features, is_test, config.audit.shift_folds, gbm)
    rows = [["cheap features", "all", auc, std]]
    if experiment is not None:
        pooled = pooled_features(experiment_checkpoint(experiment, layout), paths)
        logistic = LogisticRegression(max_iter=2000, C=0.1)
        rows.append(["model features", experiment.run_name,
                     *shift_auc(pooled, is_test, config.audit.shift_folds, logistic)[:2]])
    rows += [["feature", name, value, float("nan")]
             for name, value in feature_separation(features, is_test)]
    train = frame["part"] == "train"
    test_like = frame[train].assign(p_test=p_test[train.to_numpy()]).sort_values(
        "p_test", ascending=False).head(config.audit.test_like)
    return (pd.DataFrame(rows, columns=["what", "name", "auc", "auc_std"]),
            test_like[["id", "label", "p_test"]])


def experiment_checkpoint(experiment: Config, layout: Layout) -> Path:
    """The first trained fold's best.pt: its pooled features describe the images."""
    exp = layout.experiment(experiment.run_name)
    folds = layout.fold_numbers(exp.name)
    for k in folds:
        if exp.fold(k).best.is_file():
            return exp.fold(k).best
    raise PipelineError(f"{exp.dir} has no trained fold: "
                        f"`{make_command('train', layout.competition, MODEL=exp.name)}` first")


def audit_shift(config: Config, layout: Layout, images: AuditedImages,
                experiment: Config | None, *, force: bool) -> list[list]:
    findings = layout.findings
    inputs = {**images.inputs(),
              "settings": fingerprint([config.audit.shift_folds, config.audit.test_like])}
    if experiment is not None:
        inputs["model"] = fingerprint(str(experiment_checkpoint(experiment, layout).stat()))

    def compute() -> list[Path]:
        table, test_like = shift_tables(images, config, experiment, layout=layout)
        write_csv_atomic(table, findings.shift)
        write_csv_atomic(test_like, findings.test_like)
        return [findings.shift, findings.test_like]

    run_finding(findings.shift, findings.manifest(findings.shift), inputs, force, compute=compute,
                what="shift")
    table = pd.read_csv(findings.shift)
    sets = table[table["what"] != "feature"]
    top = table[table["what"] == "feature"].head(3)
    return [[f"train/test AUC, {r.what} ({r.name})", f"{r.auc:.3f} ± {r.auc_std:.3f}"]
            for r in sets.itertuples()] + \
        [["most separating features", ", ".join(f"{r.name} {r.auc:.2f}" for r in top.itertuples())]]


# --------------------------------------------------------------------------------------------
# Label suspects


def label_suspects(oof: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The rows confident learning flags, most suspect first: id, given and predicted label,
    the probabilities of both (cleanlab ranks by the given label's probability)."""
    from cleanlab.filter import find_label_issues  # 1.6 s to import: read when suspects are due

    scorer = Scorer(tuple(classes), "accuracy", False, 1)
    targets, probs = scorer.targets(oof["label"]), scorer.probs_of(oof)
    ranked = find_label_issues(targets, probs, return_indices_ranked_by="self_confidence")
    predicted = probs.argmax(axis=1)
    return pd.DataFrame({
        "rank": np.arange(1, len(ranked) + 1), "id": oof["id"].to_numpy()[ranked],
        "given": oof["label"].to_numpy()[ranked],
        "predicted": np.asarray(classes, dtype=object)[predicted[ranked]],
        "p_given": probs[ranked, targets[ranked]], "p_predicted": probs[ranked, predicted[ranked]]})


# A model less than this share of the way from chance to a perfect score ranks labels by noise
NEAR_CHANCE_SKILL = 0.25


def skill_over_chance(oof: pd.DataFrame, data: DataConfig) -> tuple[float, float, float]:
    """(the OOF's metric, the metric of chance: every row given the class shares, the share of
    the way from chance to a perfect score the model goes). Chance per metric, measured rather
    than assumed: accuracy the majority share, QWK 0, AUC 0.5, log-loss the prior's entropy."""
    scorer = Scorer.of(data)
    targets, probs = scorer.targets(oof["label"]), scorer.probs_of(oof)
    prior = np.bincount(targets, minlength=scorer.n_classes) / len(targets)
    chance = scorer.score(targets, np.tile(prior, (len(targets), 1)))
    model = scorer.score(targets, probs)
    perfect = 1.0 if higher_is_better(data.metric) else 0.0
    return model, chance, (model - chance) / (perfect - chance) if perfect != chance else 1.0


def experiment_oof(experiment: Config, layout: Layout) -> tuple[pd.DataFrame, dict[str, str]]:
    """(the experiment's OOF rows of every fold, TTA where predicted; the fingerprint of the
    files they came from), refused unless every fold of the fold file is current."""
    folds = read_folds(experiment.data, experiment.folds, layout)
    _, test_fingerprint = read_test_set(experiment.data)
    state = experiment_state(experiment.data, layout, experiment.run_name, folds,
                             test_fingerprint=test_fingerprint, experiment=experiment, with_refit=False)
    if state is None or state.missing_folds or len(state.current_folds) != len(state.folds):
        competition, name = layout.competition, experiment.run_name
        raise PipelineError(f"label suspects need the OOF of every fold of {name}: "
                            f"`{make_command('train', competition, MODEL=name)}` first "
                            f"(`{make_command('status', competition, MODEL=name)}` says what "
                            f"is missing)")
    files = [oof_file(state.exp.fold(k)) for k in state.current_folds]
    return pd.concat([read_probs(path) for path in files]), label_issue_inputs(state)


def audit_labels(experiment: Config, layout: Layout, images: AuditedImages,
                 force: bool) -> list[list]:
    findings, name = layout.findings, experiment.run_name
    oof, inputs = experiment_oof(experiment, layout)
    issues = findings.label_issues(name)

    def compute() -> list[Path]:
        suspects = label_suspects(oof, experiment.data.classes)
        write_csv_atomic(suspects, issues)
        shown = suspects.head(experiment.audit.shown)
        frame, paths = images.usable
        where = dict(zip(frame["part"] + "/" + frame["id"], paths))
        pictures = [(where[f"train/{r.id}"], f"{r.id}\n{r.given} -> {r.predicted} "
                                             f"({r.p_predicted:.2f})")
                    for r in shown.itertuples()]
        plots.write_image_rows([pictures[i:i + 8] for i in range(0, len(pictures), 8)],
                               findings.suspects_png(name),
                               f"label suspects of {name}: given -> predicted (probability)")
        return [issues, findings.suspects_png(name)]

    run_finding(issues, findings.manifest(issues), inputs, force, compute=compute, what="label issues")
    suspects = pd.read_csv(issues, dtype={"id": str, "given": str, "predicted": str})
    without = make_command("train", experiment.data.name, MODEL="<model>",
                           ARGS=f"train.exclude={issues}")
    rows = [[f"label suspects ({name})", f"{len(suspects)} of {len(oof)} rows -> {issues}"],
            ["remedy", f"`{without}` trains without them"]]
    model, chance, skill = skill_over_chance(oof, experiment.data)
    if skill < NEAR_CHANCE_SKILL:
        caution = (f"the OOF {experiment.data.metric} of {name} is {model:.3f}, near chance "
                   f"({chance:.3f} from the class shares alone): its suspects are unreliable; "
                   f"audit with a better model")
        warn(caution)
        rows.append(["caution", caution])
    return rows


# --------------------------------------------------------------------------------------------
# The stage


def check_experiment_exists(layout: Layout, experiment: Config) -> None:
    """MODEL= of an audit names a trained experiment (its OOF and checkpoint are read): an
    unknown one is refused before any image is read, listing the competition's experiments
    (training a misspelt name is not the remedy)."""
    if layout.experiment(experiment.run_name).config.is_file():
        return
    found = layout.experiment_names()
    listed = ", ".join(found) if found else \
        f"none yet (`{make_command('train', layout.competition, MODEL='<model>')}` trains one)"
    raise PipelineError(f"no experiment {experiment.run_name} of {layout.competition} in "
                        f"{layout.runs}/: MODEL= names a trained experiment; the competition's "
                        f"experiments: {listed}")


def run_audit(config: Config, experiment: Config | None, force: bool) -> list[list]:
    layout = Layout.of(config)
    if experiment is not None:
        check_experiment_exists(layout, experiment)
    images = AuditedImages.of(config.data)
    with stage_lock(layout.audit_lock, layout.audit, "audited"):
        rows = audit_duplicates(config, layout, images, force)
        rows += audit_shift(config, layout, images, experiment, force=force)
        if experiment is not None:
            rows += audit_labels(experiment, layout, images, force)
    if images.dropped:
        rows.append(["bad training images left out (data.drop_bad_images)",
                     summarize_offenders(list(images.dropped))])
    log.info(format_table(rows, ["finding", "value"]))
    log.info(f"audit of {config.data.name} -> {layout.audit}/")
    return rows


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "model", "name", "force", "overrides")


def main(args) -> None:
    config = load_config(args.data, None, args.overrides)
    experiment = load_experiment(args.data, args.model, args.overrides, args.name) \
        if args.model else None
    run_audit(config, experiment, args.force)
