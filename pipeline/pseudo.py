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

from pipeline.config import Config, load_config
from pipeline.folds import read_folds
from pipeline.provenance import fingerprint, manifest_path, write_manifest
from pipeline.utils import PipelineError, format_table, write_csv_atomic


def set_dir(config: Config, name: str) -> Path:
    return config.pseudo_path / name


def pseudo_targets(probs: np.ndarray, mode: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows (N,) bool, target distributions (N, C)) from ensemble probabilities."""
    if mode == "soft":
        return np.ones(len(probs), bool), probs
    keep = probs.max(axis=1) >= threshold
    hard = np.zeros_like(probs)
    hard[np.arange(len(probs)), probs.argmax(axis=1)] = 1.0
    return keep, hard


def make_pseudo_set(config: Config, models: list[str] | None) -> str:
    """Write the pseudo-label set of the current members; returns its name."""
    from pipeline.ensemble import aligned_test, select_members
    from pipeline.predict import read_test_set

    folds = read_folds(config)
    test_ids, test_fingerprint = read_test_set(config.data)
    checks, left_out = select_members(config, models, folds, test_fingerprint, partial=False,
                                      refit_weight=0.0)
    for note in left_out:
        print(f"note: {note}")
    classes, settings = config.data.classes, config.pseudo
    sources = {c.name: {k: (c.config.run_dir / f"fold{k}" / "predict.manifest.json").read_text()
                        for k in c.folds} for c in checks}
    threshold = "" if settings.mode == "soft" else f"{settings.threshold:g}"
    name = (f"{'+'.join(c.name for c in checks)}-{settings.mode}{threshold}-"
            f"{fingerprint([sources, settings.model_dump()])[:6]}")
    out = set_dir(config, name)
    per_fold = {}
    for k in sorted(int(f) for f in folds["fold"].unique()):
        members = [aligned_test(c.config.run_dir / f"fold{k}" / "test_probs.csv", classes,
                                 test_ids)[1] for c in checks]
        per_fold[f"fold{k}"] = np.mean(members, axis=0)
    per_fold["full"] = np.mean(list(per_fold.values()), axis=0)
    rows = []
    for part, probs in per_fold.items():
        keep, targets = pseudo_targets(probs, settings.mode, settings.threshold)
        frame = pd.DataFrame(targets[keep], columns=classes)
        frame.insert(0, "id", np.asarray(test_ids, dtype=object)[keep])
        write_csv_atomic(frame, out / f"{part}.csv")
        rows.append([part, int(keep.sum()), len(test_ids)])
    write_manifest(manifest_path(out, "pseudo"), "pseudo",
                   {"members": fingerprint(sources), "test": test_fingerprint,
                    "settings": fingerprint(settings.model_dump())},
                   [out / f"{part}.csv" for part in per_fold],
                   {"members": [c.name for c in checks], "settings": settings.model_dump()})
    print(format_table(rows, ["part", "pseudo-labelled", "test images"]))
    print(f"pseudo-label set {name} ({settings.mode}) -> {out}")
    return name


def read_pseudo(config: Config, part: str) -> tuple[list[str], np.ndarray]:
    """(test ids, target distributions (N, C)) of one part (fold<k> or full) of train.pseudo."""
    path = set_dir(config, config.train.pseudo) / f"{part}.csv"
    if not path.is_file():
        raise PipelineError(f"{path} not found: train.pseudo={config.train.pseudo} names no "
                            f"pseudo-label set of {config.data.name}; run `make pseudo MODEL=...`")
    frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    return frame["id"].tolist(), frame[config.data.classes].to_numpy(np.float32)


def pseudo_fingerprint(config: Config) -> str | None:
    """The training input of a pseudo-label set: its manifest (the digests of every part)."""
    if not config.train.pseudo:
        return None
    path = manifest_path(set_dir(config, config.train.pseudo), "pseudo")
    if not path.is_file():
        raise PipelineError(f"no pseudo-label set {config.train.pseudo} in {config.pseudo_path}: "
                            f"run `make pseudo MODEL=...` first")
    return fingerprint(path.read_text())


def oof_score(config: Config) -> float | None:
    from pipeline.train import current_folds

    summary = config.run_dir / "summary.csv"
    if not summary.is_file() or not current_folds(config, read_folds(config)):
        return None
    from pipeline.runs import cv_numbers, experiment_state, read_folds_unchecked
    from pipeline.predict import read_test_set

    _, test_fingerprint = read_test_set(config.data)
    state = experiment_state(config, config.run_name, read_folds_unchecked(config),
                             test_fingerprint, None)
    return None if state is None else cv_numbers(state)["oof"]


def main(args) -> None:
    from pipeline.ensemble import parse_models
    from pipeline.predict import run_predict
    from pipeline.train import run_training

    if args.model is None:
        raise PipelineError("pseudo needs the experiment of round two: make pseudo MODEL=resnet18")
    first = load_config(args.data, args.model, args.overrides, name=args.name)
    name = make_pseudo_set(first, parse_models(args.models))
    second = load_config(args.data, args.model, [*args.overrides, f"train.pseudo={name}"])
    if args.name:
        second = second.model_copy(update={"run_name": f"{args.name}-pseudo"})
    print(f"== round two: {second.run_name}")
    run_training(second, args.folds, args.force)
    run_predict(second, args.folds, args.force)
    metric = first.data.metric
    rows = [[first.run_name, "without pseudo-labels", oof_score(first)],
            [second.run_name, f"with {name}", oof_score(second)]]
    print(format_table([[a, b, "-" if c is None else c] for a, b, c in rows],
                       ["experiment", "", f"oof {metric}"]))
