"""What the audit changes: the CV gap of duplicates, and the label suspects.

    python -m bench.audit_effects [--quick] [--seeds 0,1]

1. Duplicates: a competition built from scikit-learn's digits (64 px) whose training images come
   in groups of near copies (each digit with three copies: re-encoded as JPEG, brightened,
   shifted by a pixel), its test set of other digits without copies. Trained with folds split at
   random (copies on both sides of a split) and with the audit's duplicate groups kept in one
   fold: the CV beside each submission against its held-out score.
2. Label suspects: the suite's noisy-labels member (bench/suite_data.py: 8% of the training
   labels wrong, flipped.csv names them). `make audit MODEL=` ranks suspects from the OOF
   probabilities; precision and recall of the list against the flipped rows; then the same
   recipe trained without the suspects (train.exclude): held-out accuracy with and without.

Every run goes through the pipeline's own stages (bench/suite.py's run_recipe). Appended to
bench/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from bench import Table, machine, record
from bench.duplicates import copy_of
from bench.suite import COMMON, RECIPES, quiet_cli, run_recipe
from bench.suite_data import digits_data, export_noisy, split, write_competition

COPY_KINDS = ("jpeg", "bright", "shift")


def export_copies(root: Path, n_bases: int, seed: int) -> Path:
    """n_bases digits, each with three near copies, as the labelled part; n_bases other digits
    as the test part."""
    images, labels = digits_data(seed)
    big = np.stack([cv2.resize(i, (64, 64), interpolation=cv2.INTER_LINEAR) for i in images])
    train, test = split(n_bases, len(labels), np.random.default_rng(seed + 7))
    test = test[:n_bases]
    ids, pictures, names = [], [], []
    for i in train:
        for k, kind in enumerate(("original", *COPY_KINDS)):
            ids.append(f"a{i:04d}_{k}")
            pictures.append(big[i] if kind == "original" else copy_of(big[i], kind))
            names.append(str(labels[i]))
    return write_competition(root, "copies", (ids, pictures, names),
                             ([f"t{i:04d}" for i in test], big[test],
                              labels[test].astype(str)),
                             {"classes": [str(c) for c in range(10)], "metric": "accuracy",
                              "image_path": "{id}.png", "defaults": {"augment": {
                                  "image_size": 32, "interpolation": "area"}}})


def duplicate_gap(root: Path, seeds: list[int], epochs: int, n_bases: int) -> list[list]:
    data = export_copies(root / "data", n_bases, 0)
    rows = []
    for grouped in (False, True):
        work = root / ("grouped" if grouped else "random")
        where = [f"folds.dir={work / 'folds'}", f"runs_dir={work / 'runs'}",
                 f"audit_dir={work / 'audit'}", *COMMON, f"folds.duplicates={grouped}"]
        if grouped:
            quiet_cli(["audit", "--data", str(data), *where], work / "audit.log")
        quiet_cli(["folds", "--data", str(data), *where], work / "folds.log")
        results = [run_recipe(data, work, "default", seed, epochs,
                              shared=[f"folds.duplicates={grouped}"]) for seed in seeds]
        rows.append(["kept in one fold" if grouped else "split at random",
                     mean_std([r.cv for r in results]), mean_std([r.test for r in results]),
                     mean_std([r.cv - r.test for r in results])])
    return rows


def label_effect(root: Path, seeds: list[int], epochs: int, n: int) -> list[list]:
    data = export_noisy(root / "data", n, 0)
    flipped = set(pd.read_csv(data.parent / "noisy-labels" / "flipped.csv", dtype=str)["id"])
    work = root / "noisy-labels"
    where = [f"folds.dir={work / 'folds'}", f"runs_dir={work / 'runs'}",
             f"audit_dir={work / 'audit'}", *COMMON]
    # audit first, then split: the digits hold near copies of their own, and folds made
    # before the audit that found them are stale by the usual rule
    quiet_cli(["audit", "--data", str(data), *where], work / "audit.log")
    quiet_cli(["folds", "--data", str(data), *where], work / "folds.log")
    rows = []
    for seed in seeds:
        plain = run_recipe(data, work, "default", seed, epochs)
        name = f"default-s{seed}"
        quiet_cli(["audit", "--data", str(data), "--model", "resnet20", "--name", name, *where,
                   f"train.epochs={epochs}", f"train.seed={seed}"], work / f"{name}.log")
        issues = work / "audit" / "noisy-labels" / f"label_issues_{name}.csv"
        suspects = set(pd.read_csv(issues, dtype=str)["id"])
        hits = len(suspects & flipped)
        cleaned = run_recipe(data, work, "default", seed, epochs, [f"train.exclude={issues}"],
                             suffix="-clean")
        rows.append([seed, len(suspects), f"{hits / max(len(suspects), 1):.2f}",
                     f"{hits / len(flipped):.2f}", f"{plain.test:.4f}", f"{cleaned.test:.4f}",
                     f"{cleaned.test - plain.test:+.4f}"])
    return rows


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_effects",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--no-record", action="store_true", help="print, do not append")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    epochs, n_bases, n = (1, 20, 60) if args.quick else (args.epochs, 150, 600)
    about, started = machine(), time.perf_counter()
    assert "default" in RECIPES
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        gap = duplicate_gap(Path(tmp) / "copies", seeds, epochs, n_bases)
        labels = label_effect(Path(tmp) / "labels", seeds, epochs, n)
    tables = [
        Table(f"Duplicates and the CV: {n_bases} digits x 4 near copies as the labelled part, "
              f"{n_bases} other digits as the test part (resnet20, 3 folds, {epochs} epochs, "
              f"seeds {seeds})", ["folds", "CV", "held-out accuracy", "CV - held-out"], gap,
              ["the groups of the duplicate finder (pipeline/data/duplicates.py; 64 px images)"]),
        Table(f"Label suspects on the noisy-labels member: {n} labelled digits, 8% of the labels "
              f"wrong (resnet20, 3 folds, {epochs} epochs)",
              ["seed", "suspects", "precision", "recall", "held-out accuracy",
               "held-out, suspects excluded", "change"], labels)]
    minutes = (time.perf_counter() - started) / 60
    command = " ".join(sys.argv[1:] if argv is None else argv)
    record(tables, f"python -m bench.audit_effects {command} ({minutes:.1f} min)", about,
           append=not args.no_record)


if __name__ == "__main__":
    main()
