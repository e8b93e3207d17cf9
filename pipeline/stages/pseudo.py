"""Pseudo-labels: the test images, labelled by the current ensemble, join each fold's training.

    python -m pipeline pseudo --data retina --model resnet18 [--models "a b"] [pseudo.mode=soft]
    make pseudo MODEL=resnet18 [MODELS="a b"] [ARGS="pseudo.threshold=0.95"]

1. The labels: from the current, complete members (MODELS, default every current experiment of
   the competition; stale ones are refused as by `make ensemble`). Fold k's labels are the mean
   of the members' fold-k test predictions: models that never saw fold k's labels. (The whole
   ensemble's average would carry fold k's labels into fold k's training through the other folds'
   models, and its OOF score would no longer be honest.) The refit takes the mean over the folds.
   `pseudo.mode`: hard keeps the test images whose top probability reaches `pseudo.threshold`,
   one-hot; soft keeps every test image with its predicted distribution.
   Written to pseudo/<competition>/<set>/fold<k>.csv and full.csv (id, one column per class: the
   target distribution) and, last, pseudo.manifest.json; <set> names the members and settings.
2. Round two: experiment <MODEL> with `train.pseudo=<set>` (a new experiment, named with that
   suffix), its folds trained with the set's images added to the training part only, never to
   the validation part, then predicted. The table at the end shows the out-of-fold score of
   round one and round two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.base.config import (
    Config,
    DataConfig,
    FoldsConfig,
    PseudoConfig,
    parse_models,
)
from pipeline.base.fingerprints import fingerprint
from pipeline.base.log import log
from pipeline.base.task import Scorer
from pipeline.base.utils import PipelineError, format_table, make_command, write_csv_atomic
from pipeline.ensembling.members import Candidate, select_members
from pipeline.experiments.freshness import fold_numbers, read_folds, read_test_set
from pipeline.experiments.layout import Layout
from pipeline.experiments.probfiles import aligned_test
from pipeline.experiments.runner import Step, run_step, stage_lock
from pipeline.experiments.state import cv_numbers, experiment_state, load_experiment
from pipeline.inference.experiment import predict_experiment
from pipeline.training.experiment import train_folds


def pseudo_targets(probs: np.ndarray, mode: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows (N,) bool, target distributions (N, C)) from ensemble probabilities."""
    if mode == "soft":
        return np.ones(len(probs), bool), probs
    keep = probs.max(axis=1) >= threshold
    hard = np.zeros_like(probs)
    hard[np.arange(len(probs)), probs.argmax(axis=1)] = 1.0
    return keep, hard


def set_name(members: list[Candidate], sources: dict, settings: PseudoConfig) -> str:
    """<members>-<mode><threshold>-<6 hex digits of the members' predictions and settings>."""
    threshold = "" if settings.mode == "soft" else f"{settings.threshold:g}"
    return (f"{'+'.join(c.name for c in members)}-{settings.mode}{threshold}-"
            f"{fingerprint([sources, settings.model_dump()])[:6]}")


def fold_labels(members: list[Candidate], folds: pd.DataFrame, classes: list[str],
                test_ids: list[str]) -> dict[str, np.ndarray]:
    """{fold<k>: the members' mean fold-k test probabilities, full: the mean over the folds}."""
    per_part = {}
    for k in fold_numbers(folds):
        probs = [aligned_test(c.state.exp.fold(k).test_probs, classes, test_ids)[1]
                 for c in members]
        per_part[members[0].state.exp.fold(k).name] = np.mean(probs, axis=0)
    per_part[members[0].state.exp.refit.name] = np.mean(list(per_part.values()), axis=0)
    return per_part


def make_pseudo_set(config: Config, layout: Layout, models: list[str] | None) -> str:
    """Write the pseudo-label set of the current members; returns its name."""
    with stage_lock(layout.pseudo_lock, layout.pseudo, "written"):
        return _write_pseudo_set(config, layout, models)


def _write_pseudo_set(config: Config, layout: Layout, models: list[str] | None) -> str:
    folds = read_folds(config.data, config.folds, layout)
    test_ids, test_fingerprint = read_test_set(config.data)
    members, left_out = select_members(config.data, layout, models, folds, test_fingerprint=test_fingerprint,
                                       partial=False, refit_weight=0.0)
    for note in left_out:
        log.info(f"note: {note}")
    classes, settings = config.data.classes, config.pseudo
    sources = {c.name: {k: c.state.exp.fold(k).predict_manifest.read_text() for k in c.folds}
               for c in members}
    pseudo = layout.pseudo_set(set_name(members, sources, settings))
    outputs: list[Path] = []

    def work() -> list[list]:
        rows = []
        for part, probs in fold_labels(members, folds, classes, test_ids).items():
            keep, targets = pseudo_targets(probs, settings.mode, settings.threshold)
            frame = pd.DataFrame(targets[keep], columns=classes)
            frame.insert(0, "id", np.asarray(test_ids, dtype=object)[keep])
            write_csv_atomic(frame, pseudo.part(part))
            outputs.append(pseudo.part(part))
            rows.append([part, int(keep.sum()), len(test_ids)])
        return rows

    inputs = {"members": fingerprint(sources), "test": test_fingerprint,
              "settings": fingerprint(settings.model_dump())}
    details = {"members": [c.name for c in members], "settings": settings.model_dump()}
    rows = run_step(Step("pseudo", pseudo.manifest, inputs, details, lambda: outputs, work,
                         current=""), force=True)  # written again each time: it is cheap
    log.info(format_table(rows, ["part", "pseudo-labelled", "test images"]))
    log.info(f"pseudo-label set {pseudo.name} ({settings.mode}) -> {pseudo.dir}")
    return pseudo.name


def oof_score(data: DataConfig, folds_cfg: FoldsConfig, layout: Layout,
              name: str) -> float | None:
    """The out-of-fold score of experiment `name`'s current folds (None: none current)."""
    folds = read_folds(data, folds_cfg, layout)
    _, test_fingerprint = read_test_set(data)
    state = experiment_state(data, layout, name, folds, test_fingerprint=test_fingerprint, with_refit=False)
    if state is None or not state.current_folds:
        return None
    return cv_numbers(state, Scorer.of(data))["oof"]


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "model", "models", "folds", "name", "force", "overrides")


def main(args) -> None:
    if args.model is None:
        raise PipelineError(f"pseudo needs the experiment of round two: "
                            f"{make_command('pseudo', args.data, MODEL='resnet18')}")
    first = load_experiment(args.data, args.model, args.overrides, name=args.name)
    layout = Layout.of(first)
    name = make_pseudo_set(first, layout, parse_models(args.models))
    second = load_experiment(args.data, args.model, [*args.overrides, f"train.pseudo={name}"])
    if args.name:
        second = second.model_copy(update={"run_name": f"{args.name}-pseudo"})
    log.info(f"== round two: {second.run_name}")
    train_folds(second, layout, args.folds, args.force)
    predict_experiment(second, layout, read_folds(second.data, second.folds, layout), args.folds,
                       force=args.force, test=read_test_set(second.data))
    metric = first.data.metric
    rows = [[first.run_name, "without pseudo-labels",
             oof_score(first.data, first.folds, layout, first.run_name)],
            [second.run_name, f"with {name}",
             oof_score(second.data, second.folds, layout, second.run_name)]]
    log.info(format_table([[a, b, "-" if c is None else c] for a, b, c in rows],
                          ["experiment", "", f"oof {metric}"]))
