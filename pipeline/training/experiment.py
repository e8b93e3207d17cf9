"""Train an experiment's folds, one after another, and summarise them.

    train_folds(config, layout, folds_to_train=None, force=False)   # what `make train` runs

Everything is checked before the first fold starts or FORCE=1 deletes anything: the folds to
train exist, their images are on disk, stale folds are refused together (each named), and the
model, its weights and the augmentations build. Then each fold is trained (pipeline/training/
run.py) and summary.csv|md is written over the folds that are current.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from pipeline.base.config import Config, DataConfig, FoldsConfig, save_config
from pipeline.base.log import log
from pipeline.base.task import Scorer, best_log_row
from pipeline.base.utils import (
    PipelineError,
    format_table,
    make_command,
    markdown_table,
    write_csv_atomic,
    write_text_atomic,
)
from pipeline.data.tables import test_image_paths, train_image_paths
from pipeline.experiments.budgets import write_budget
from pipeline.experiments.freshness import (
    current_folds,
    excluded_ids,
    fold_numbers,
    input_changes,
    read_folds,
    stale_remedy,
    training_inputs,
)
from pipeline.experiments.layout import Experiment, Layout
from pipeline.experiments.manifests import read_manifest
from pipeline.experiments.probfiles import read_probs, read_pseudo
from pipeline.experiments.runner import decide, on_main, stage_lock
from pipeline.experiments.searches import searched_folds, searched_note
from pipeline.experiments.state import joined_oof
from pipeline.training.budget import budgeted, epoch_seconds
from pipeline.training.parts import Rows, RunSpec
from pipeline.training.run import check_schedule, preflight, train_part


@dataclass
class Plan:
    """The folds to train now, with what they are trained from."""

    config: Config  # the command's, train.epochs from train.time_budget where one is set
    folds: pd.DataFrame  # the fold file
    todo: list[int]
    inputs: dict[str, str]
    details: dict[str, Any]


def select_folds(data: DataConfig, folds_cfg: FoldsConfig, layout: Layout,
                 folds_to_train: list[int] | None) -> tuple[pd.DataFrame, list[int]]:
    """The fold table and the folds to train, checked before any expensive work."""
    folds = read_folds(data, folds_cfg, layout)
    available = fold_numbers(folds)
    selected = folds_to_train if folds_to_train is not None else available
    unknown = sorted(set(selected) - set(available))
    if unknown:
        raise PipelineError(f"fold(s) {unknown} not in {layout.folds_csv} (folds {available})")
    missing = [p for p in train_image_paths(data, folds["id"].tolist()) if not p.is_file()]
    if missing:
        raise PipelineError(f"{len(missing)} training image(s) missing, e.g. {missing[0]}; "
                            f"run `{make_command('check', data.name)}` to list them")
    return folds, [int(fold) for fold in selected]


def plan_folds(competition: str, exp: Experiment, selected: list[int], force: bool,
               *, inputs: dict[str, str], details: dict[str, Any]) -> list[int]:
    """The folds to train now; stale folds refused (all of them named) before any work starts."""
    todo, stale = [], []
    for fold in selected:
        decision = decide(exp.fold(fold).train_manifest, inputs, details, force, on_stale="refuse")
        if decision.action == "skip":
            log.info(f"fold {fold}: current ({exp.fold(fold).dir}); FORCE=1 retrains")
        elif decision.action == "refuse":
            stale.append((fold, decision.fresh))
        else:
            todo.append(fold)
    if stale:
        lines = "\n  ".join(f"fold {k}: {fresh.why()}" for k, fresh in stale)
        raise PipelineError(f"{competition}/{exp.name} ({exp.dir}) was trained "
                            f"from other inputs:\n  {lines}\n" + stale_remedy("these folds"))
    return todo


def check_one_setting(competition: str, exp: Experiment, folds: pd.DataFrame,
                      selected: list[int], *, inputs: dict[str, str], details: dict[str, Any]) -> None:
    """An experiment's folds are all of one model and settings: training some folds under other
    settings than its other folds were trained with is refused, naming those folds."""
    others = []
    for k in fold_numbers(folds):
        manifest = read_manifest(exp.fold(k).train_manifest)
        if k in selected or manifest is None or "settings" not in manifest.inputs:
            continue
        if manifest.inputs["settings"] != inputs["settings"]:
            why = input_changes({"settings": manifest.inputs["settings"]},
                                {"settings": inputs["settings"]}, manifest.details, details)
            others.append(f"fold {k}: {'; '.join(why)}")
    if others:
        lines = "\n  ".join(others)
        raise PipelineError(
            f"{competition}/{exp.name}: its other folds were trained with other settings:\n  "
            f"{lines}\nAn experiment's folds are all of one model and settings: train every "
            f"fold under the new ones (FORCE=1 without FOLDS=), or give them a name of their "
            f"own (NAME=<new name>)")


def start_experiment(config: Config, exp: Experiment) -> None:
    """The experiment's config.yaml: its resolved settings, read by `runs` and `ensemble`."""
    on_main(lambda: save_config(config, exp.config))


def prepare_training(config: Config, layout: Layout, folds_to_train: list[int] | None,
                     force: bool, *, epoch: float | None = None) -> Plan:
    """Everything checked and the experiment's settings saved before any fold starts or
    FORCE=1 deletes anything. `epoch`: an epoch's seconds, where the caller probed already."""
    folds, selected = select_folds(config.data, config.folds, layout, folds_to_train)
    config, measured = budgeted(config, layout, probe=lambda c: epoch if epoch is not None else
                                epoch_seconds(c, probe_spec(c, layout, folds)))
    inputs, details = training_inputs(config, folds, layout)
    exp = layout.experiment(config.run_name)
    check_one_setting(config.data.name, exp, folds, selected, inputs=inputs, details=details)
    todo = plan_folds(config.data.name, exp, selected, force, inputs=inputs, details=details)
    if todo:
        check_schedule(config.augment, config.train.epochs)
        preflight(config, layout)
        start_experiment(config, exp)
        if measured is not None:  # the plan is accepted: the budget's epochs are the folds'
            on_main(lambda: write_budget(exp, measured))
    elif not exp.config.is_file():  # its folds taken over from another (make tune NAME=)
        start_experiment(config, exp)
    return Plan(config, folds, todo, inputs, details)


def training_rows(rows: pd.DataFrame, exclude: str | None) -> pd.DataFrame:
    """The rows a run trains on: without train.exclude's ids (they stay in validation)."""
    if not exclude:
        return rows
    kept = rows[~rows["id"].isin(excluded_ids(exclude))]
    log.info(f"train.exclude: {len(rows) - len(kept)} of {len(rows)} training row(s) left out")
    return kept


def pseudo_rows(data: DataConfig, pseudo: str | None, layout: Layout,
                part: str) -> tuple[list[Path], np.ndarray] | None:
    """The test images and targets of `part` (fold<k> or full) of the pseudo-label set
    `pseudo` (train.pseudo), or None without one."""
    if not pseudo:
        return None
    ids, targets = read_pseudo(layout.pseudo_set(pseudo), part, data.classes)
    return test_image_paths(data, ids), targets


def fold_spec(config: Config, layout: Layout, folds: pd.DataFrame, fold: int, *,
              inputs: dict[str, str]) -> RunSpec:
    """What fold `fold` of the experiment trains on and validates with."""
    part = layout.experiment(config.run_name).fold(fold)
    train_rows = training_rows(folds[folds["fold"] != fold], config.train.exclude)
    return RunSpec(part=part, train_rows=Rows.of(train_rows),
                   valid_rows=Rows.of(folds[folds["fold"] == fold]), seed=config.train.seed + fold,
                   tag=f"fold {fold}", inputs=inputs, micro_batches=layout.micro_batches,
                   pseudo=lambda: pseudo_rows(config.data, config.train.pseudo, layout, part.name))


def probe_spec(config: Config, layout: Layout, folds: pd.DataFrame) -> RunSpec:
    """Fold 0's run, as a timing probe trains it (train.time_budget)."""
    inputs, _ = training_inputs(config, folds, layout)
    return fold_spec(config, layout, folds, 0, inputs=inputs)


def train_fold(config: Config, layout: Layout, plan: Plan, fold: int, *, force: bool) -> None:
    """Train one fold of the plan (every rank, under torchrun)."""
    spec = fold_spec(config, layout, plan.folds, fold, inputs=plan.inputs)
    part = spec.part
    details = {**plan.details, "fold": fold, "train_rows": len(spec.train_rows.ids),
               "valid_rows": len(spec.valid_rows.ids)}
    train_part(config, spec, details, force,
               what=f"{config.data.name}/{config.run_name} fold {fold} ({part.dir})")


def train_folds(config: Config, layout: Layout, folds_to_train: list[int] | None,
                force: bool, *, epoch: float | None = None) -> pd.DataFrame | None:
    """Train the folds one after another (each over every rank when started by torchrun), one
    process at a time on the experiment. `epoch`: train.time_budget's probe, where the caller
    measured it (`make auto`)."""
    exp = layout.experiment(config.run_name)
    with stage_lock(exp.lock, exp.dir, "trained"):
        plan = prepare_training(config, layout, folds_to_train, force, epoch=epoch)
        for fold in plan.todo:
            train_fold(plan.config, layout, plan, fold, force=force)
        return on_main(lambda: write_summary(plan.config, layout, plan.folds))


# --------------------------------------------------------------------------------------------
# The summary over the folds


def fold_result(exp: Experiment, fold: int, scorer: Scorer) -> dict[str, Any]:
    """A finished fold's numbers, read back from its files."""
    log = pd.read_csv(exp.fold(fold).log)
    best = best_log_row(log, scorer.metric)
    return {"fold": fold, "best_epoch": int(best["epoch"]), "epochs": len(log),
            scorer.metric: scorer.score_frame(read_probs(exp.fold(fold).oof)),
            "seconds": round(float(log["seconds"].sum()), 1)}


def write_summary(config: Config, layout: Layout, folds: pd.DataFrame) -> pd.DataFrame | None:
    """summary.csv|md: per-fold scores, mean, std, and the OOF score of the current folds (a
    stale or missing fold is left out, and the count says so; so is a fold that chose the
    experiment's settings in `make tune`, from the mean and the OOF, its row marked)."""
    exp, scorer = layout.experiment(config.run_name), Scorer.of(config.data)
    done = current_folds(config, folds, layout)
    for path in (exp.summary_csv, exp.summary_md):
        path.unlink(missing_ok=True)  # never a summary of folds that are no longer current
    if not done:
        return None
    results = pd.DataFrame([fold_result(exp, k, scorer) for k in done])
    searched = [k for k in searched_folds(exp) if k in done]
    scored = [k for k in done if k not in searched] or done
    oof = joined_oof(exp, scored)
    targets, probs = scorer.targets(oof["label"]), scorer.probs_of(oof)
    overall = scorer.report(targets, probs)
    write_csv_atomic(results, exp.summary_csv)
    n_folds, metric = folds["fold"].nunique(), scorer.metric
    partial = "" if len(done) == n_folds else f" (PARTIAL: {len(done)} of {n_folds} folds)"
    if searched:
        partial += (f" ({searched_note(exp)})" if scored != done else
                    f" (fold(s) {searched} alone, which chose its settings in make tune: "
                    f"optimistic)")
    table = [[f"{r['fold']} (search)" if r["fold"] in searched else r["fold"], r["best_epoch"],
              r["epochs"], r[metric], r["seconds"]] for r in results.to_dict("records")]
    headers = ["fold", "best epoch", "epochs", metric, "seconds"]
    in_cv = results[results["fold"].isin(scored)]
    write_text_atomic(exp.summary_md, summary_markdown(
        config.data, config.run_name, in_cv, table, headers=headers, overall=overall,
        n_oof=len(oof), partial=partial, n_folds=n_folds,
        matrix=confusion_matrix(targets, probs.argmax(1), labels=range(scorer.n_classes))))
    log.info(format_table(table + [["mean", "", "", float(in_cv[metric].mean()), ""],
                                ["oof", "", "", overall[metric], ""]], headers))
    log.info(f"{config.run_name}: out-of-fold {metric} {overall[metric]:.4f} over {len(oof)} images"
          f"{partial} -> {exp.summary_md}")
    return results


def summary_markdown(data: DataConfig, name: str, results: pd.DataFrame, table: list,
                     *, headers: list[str], overall: dict[str, float], n_oof: int, partial: str,
                     n_folds: int, matrix: np.ndarray) -> str:
    metric, classes = data.metric, data.classes
    return (f"# {name} on {data.name}{partial}\n\n"
            + markdown_table(table, headers)
            + f"\n\nmean {metric} {results[metric].mean():.4f} ± "
              f"{results[metric].std(ddof=0):.4f} over {len(results)} of {n_folds} fold(s)"
              f"\n\nout-of-fold over {n_oof} images: "
            + ", ".join(f"{k} {v:.4f}" for k, v in overall.items())
            + "\n\n## Out-of-fold confusion matrix (rows: true, columns: predicted)\n\n"
            + markdown_table([[c, *row] for c, row in zip(classes, matrix.tolist())],
                             ["", *classes]) + "\n")
