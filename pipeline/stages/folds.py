"""Stratified K folds, written once per competition to folds/<competition>.csv.

    python -m pipeline folds --data digits        # make folds

Uses StratifiedKFold, or StratifiedGroupKFold when the competition names a group (both eyes of
one patient stay in one fold). Every later stage reads the fold file and never re-splits. The
data is checked first (pipeline/data/checks.py), so bad data stops here, before any training.

The manifest beside it (folds/<competition>.manifest.json) records the labelled rows, the
training images and the fold settings it was made from (pipeline/experiments/freshness.py, fold_inputs):
`make folds` splits again when one of them changed (a fixed label, added rows, another n_splits),
and every later stage refuses folds that no longer fit the data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.base.config import Config, FoldsConfig, load_config
from pipeline.base.fingerprints import folds_fingerprint
from pipeline.base.log import log
from pipeline.base.task import class_index, targets_of
from pipeline.base.utils import PipelineError, format_table, warn, write_csv_atomic
from pipeline.data.checks import Checked
from pipeline.data.duplicates import conflicts as dup_conflicts
from pipeline.data.duplicates import describe_conflicts, groups_for_folds, merged_groups
from pipeline.experiments.findings import AuditedImages, duplicates_finding
from pipeline.experiments.freshness import (
    duplicate_groups,
    fold_inputs,
)
from pipeline.experiments.layout import Layout
from pipeline.experiments.runner import Step, run_step, stage_lock


def assign_folds(table: pd.DataFrame, n_splits: int, seed: int) -> pd.DataFrame:
    """Return `table` (id, label, target[, group]) with a `fold` column 0..n_splits-1.

    Deterministic for a given row order, n_splits and seed.
    """
    counts = table["target"].value_counts()
    if counts.max() < n_splits:
        raise PipelineError(f"no class has {n_splits} images; lower folds.n_splits")
    rare = sorted(table.loc[table["target"].isin(counts[counts < n_splits].index), "label"].unique())
    if rare:
        warn(f"class(es) {rare} have fewer images than folds ({n_splits}): some folds will "
             f"validate without them")
    if "group" in table:
        fold = grouped_folds(table, n_splits, seed)
    else:
        fold = np.full(len(table), -1, dtype=np.int64)
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for k, (_, valid_idx) in enumerate(splitter.split(table, table["target"])):
            fold[valid_idx] = k
    columns = ["id", "label", "fold"] + (["group"] if "group" in table else [])
    folds = table.assign(fold=fold)[columns]
    if "group" in folds:
        warn_broken_strata(folds, n_splits)
    return folds


def grouped_folds(table: pd.DataFrame, n_splits: int, seed: int) -> np.ndarray:
    """(N,) a fold per row that keeps each group in one fold, each class's count even across
    the folds. scikit-learn's StratifiedGroupKFold places the groups of two images or more;
    the images alone (most rows: a group each) are then dealt, class by class in a shuffled
    order, to the fold that has the fewest of their class (ties: the fewest rows in all). The same split as the
    StratifiedGroupKFold of every group, near enough, without its loop over each group in
    Python (19 s of a `make folds` of 35,000 images, bench/BENCHMARKS.md)."""
    together = (table.groupby("group")["group"].transform("size") > 1).to_numpy()
    targets = table["target"].to_numpy()
    fold = np.full(len(table), -1, dtype=np.int64)
    rows = np.flatnonzero(together)
    groups = table["group"].to_numpy()[rows]
    stratifiable = (len(np.unique(groups)) >= n_splits
                    and len(rows) and np.unique(targets[rows], return_counts=True)[1].max() >= n_splits)
    if stratifiable:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for k, (_, valid) in enumerate(splitter.split(rows, targets[rows], groups=groups)):
            fold[rows[valid]] = k
    else:  # too few to stratify (scikit-learn refuses): each to the fold with fewest rows yet
        names, sizes = np.unique(groups, return_counts=True)
        for name in names[np.argsort(-sizes, kind="stable")]:
            members = rows[groups == name]
            fold[members] = int(np.argmin(np.bincount(fold[fold >= 0], minlength=n_splits)))
    rng = np.random.default_rng(seed)
    totals = np.bincount(fold[together], minlength=n_splits)  # rows per fold, every class
    for target in np.unique(targets):
        of_class = targets == target
        counts = np.bincount(fold[of_class & together], minlength=n_splits)
        for row in rng.permutation(np.flatnonzero(of_class & ~together)):
            # the fewest of this class; among those, the fewest rows of all (else a class's
            # leftover rows, and a rare class's all, would land in the first folds every time)
            fold[row] = int(np.lexsort((totals, counts))[0])
            counts[fold[row]] += 1
            totals[fold[row]] += 1
    return fold


# How far a grouped split may move a class's count in a fold from its even share (count / K)
# before it is warned of: this fraction of the share, and never less than SHARE_SLACK_ROWS rows
# (a group of a few rows tips a small class's count by as many: no news).
SHARE_TOLERANCE = 0.25
SHARE_SLACK_ROWS = 2
LARGEST_GROUPS_SHOWN = 5


def warn_broken_strata(folds: pd.DataFrame, n_splits: int) -> None:
    """A grouped split keeps each group in one fold; a group too large for a fold (a duplicate
    audit that chained many images) then moves class shares, and stratification breaks without
    a word. Warn, with the per-fold class counts and the largest groups to blame."""
    counts = pd.crosstab(folds["label"], folds["fold"])
    even = counts.sum(axis=1).to_numpy()[:, None] / n_splits
    off = np.abs(counts.to_numpy() - even)
    broken = (off > np.maximum(SHARE_TOLERANCE * even, SHARE_SLACK_ROWS)).any(axis=1)
    if not broken.any():
        return
    sizes = folds["group"].value_counts().head(LARGEST_GROUPS_SHOWN)
    largest = ", ".join(f"{group!r} ({size} images, {size / len(folds):.0%} of the rows)"
                        for group, size in sizes.items())
    per_class = "; ".join(f"class {label!r}: {'/'.join(map(str, counts.loc[label]))} "
                          f"where even is {even[i, 0]:.0f} per fold"
                          for i, label in enumerate(counts.index) if broken[i])
    warn(f"the grouped split moved class shares beyond {SHARE_TOLERANCE:.0%} of a fold's even "
         f"share (a group is kept in one fold): {per_class}. Largest groups: {largest}. A group "
         f"that holds a large share of the rows (duplicate groups that chain many images: "
         f"folds.duplicates=false splits without them) cannot be split evenly")


def with_duplicates(table: pd.DataFrame, classes: list[str], folds_cfg: FoldsConfig,
                    layout: Layout) -> pd.DataFrame:
    """The labelled rows with the audit's duplicate groups joined to their groups (a patient's
    copies and the copies' patients all in one fold), and its conflicting groups kept, dropped
    or relabelled (folds.duplicate_conflicts)."""
    if not folds_cfg.duplicates:
        return table
    groups = duplicate_groups(layout)
    if groups is None or groups.empty:
        return table
    found = dup_conflicts(groups.assign(part="train"))
    if len(found):
        table = resolve_conflicts(table, groups, found, classes, policy=folds_cfg.duplicate_conflicts)
    in_group = groups_for_folds(groups.assign(part="train"), table["id"].tolist())
    existing = table["group"].astype(str) if "group" in table else [""] * len(table)
    merged = merged_groups(table["id"].tolist(), list(existing), list(in_group))
    log.info(f"{len(groups)} labelled image(s) in {groups['group'].nunique()} duplicate group(s) "
             f"({layout.findings.duplicates}): each group kept in one fold")
    return table.assign(group=merged.to_numpy())


def resolve_conflicts(table: pd.DataFrame, groups: pd.DataFrame, found: pd.DataFrame,
                      classes: list[str], *, policy: str) -> pd.DataFrame:
    """Conflicting duplicate groups: listed; with `drop` their rows go, with `majority` they
    take the group's most frequent label."""
    rows = groups[groups["group"].isin(found["group"])]
    listed = describe_conflicts(found, rows.assign(part="train"))
    if policy == "keep":
        warn(f"duplicate groups with conflicting labels: {listed}; kept as labelled "
             f"(folds.duplicate_conflicts=drop leaves them out, =majority relabels them)")
        return table
    if policy == "drop":
        warn(f"left out {len(rows)} row(s) of duplicate groups with conflicting labels: {listed}")
        return table[~table["id"].isin(rows["id"])].reset_index(drop=True)
    order = class_index(classes)

    def most_frequent(labels: pd.Series) -> str:  # ties: the first in the class list
        counts = labels.value_counts()
        return min(counts.index, key=lambda label: (-counts[label], order[label]))

    relabel = rows.set_index("id")["group"].map(rows.groupby("group")["label"].agg(most_frequent))
    changed = table["id"].map(relabel).fillna(table["label"])
    warn(f"relabelled {int((changed != table['label']).sum())} row(s) of duplicate groups with "
         f"conflicting labels to their group's majority: {listed}")
    return table.assign(label=changed, target=targets_of(changed, classes))


def fold_table(folds: pd.DataFrame, classes: list[str]) -> str:
    """Per fold: size and the count of each class."""
    rows = []
    for k, part in folds.groupby("fold"):
        counts = part["label"].value_counts()
        rows.append([int(k), len(part), *[int(counts.get(c, 0)) for c in classes]])
    counts = folds["label"].value_counts()
    rows.append(["all", len(folds), *[int(counts.get(c, 0)) for c in classes]])
    return format_table(rows, ["fold", "images", *classes])


def make_folds(config: Config, drop_bad: bool | None = None,
               force: bool = True) -> pd.DataFrame | None:
    """Check the data, split it, write folds/<competition>.csv and, last, its manifest; without
    `force`, only when the fold file is not current. The folds, or None when skipped."""
    if drop_bad is not None and drop_bad != config.data.drop_bad_images:
        config = config.model_copy(update={"data": config.data.model_copy(
            update={"drop_bad_images": drop_bad})})
    layout = Layout.of(config)
    # the images are checked once, when the first of the duplicate pass and the split needs them
    checked = Checked(config.data)
    if config.folds.duplicates:
        find_copies(config, layout, checked)

    def split() -> tuple[pd.DataFrame, dict[str, str]]:
        result = checked()
        table = with_duplicates(result.train, config.data.classes, config.folds, layout)
        return assign_folds(table, config.folds.n_splits, config.folds.seed), result.dropped

    with stage_lock(layout.folds_lock, layout.folds_csv, "split"):
        recorded = fold_inputs(config.data, config.folds, layout)  # the files as checked
        done = run_step(folds_step(config, layout, recorded, split), force)
    if done is None:
        return None
    folds, dropped = done
    log.info(fold_table(folds, config.data.classes))
    log.info(f"wrote {layout.folds_csv} ({len(folds)} images, {config.folds.n_splits} folds"
             f"{', grouped' if 'group' in folds else ''}"
             f"{f', {len(dropped)} bad image(s) left out' if dropped else ''})")
    return folds


def find_copies(config: Config, layout: Layout,
                checked: Checked | None = None) -> None:
    """The competition's duplicate groups, found unless current (the audit's own finding,
    audit/<competition>/duplicates.csv: found once, by whichever of `make folds` and `make
    audit` comes first), so that a competitor who never audits still gets folds that keep
    copies together. folds.duplicates=false splits without them."""
    with stage_lock(layout.audit_lock, layout.audit, "audited"):
        duplicates_finding(config, layout, AuditedImages.of(config.data, checked),
                           force=False)


def folds_step(config: Config, layout: Layout, inputs: tuple[dict, dict],
               split: Callable[[], tuple[pd.DataFrame, dict[str, str]]]) -> Step:
    """The fold file (and the list of bad images left out) from `split`'s (folds, dropped)."""
    def work() -> tuple[pd.DataFrame, dict[str, str]]:
        folds, dropped = split()
        columns = ["id", "label", "fold"] + (["group"] if "group" in folds else [])
        write_csv_atomic(folds[columns], layout.folds_csv)
        if dropped:
            frame = pd.DataFrame({"id": list(dropped), "problem": list(dropped.values())})
            write_csv_atomic(frame, layout.folds_dropped)
        else:
            layout.folds_dropped.unlink(missing_ok=True)
        return folds, dropped

    def outputs() -> list[Path]:
        return [p for p in (layout.folds_csv, layout.folds_dropped) if p.is_file()]

    return Step("folds", layout.folds_manifest, *inputs, outputs, work,
                current=f"{layout.folds_csv} is current for {config.data.name} (FORCE=1 splits "
                        f"again)",
                redo=f"{layout.folds_csv}: {{why}}: splitting again",
                recorded=lambda done: {"images": len(done[0]), "dropped": len(done[1]),
                                       "folds": folds_fingerprint(done[0])})


def write_folds(config: Config, folds: pd.DataFrame, dropped: dict[str, str] | None = None) -> None:
    """Write a fold assignment (id, label, fold[, group]) and, last, its manifest: the way in
    for folds made elsewhere (a public kernel's split). Written through here they carry the
    fingerprints of the data as it is now, like folds this stage made."""
    layout = Layout.of(config)
    inputs = fold_inputs(config.data, config.folds, layout)
    run_step(folds_step(config, layout, inputs, lambda: (folds, dropped or {})), force=True)


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "drop_bad", "force", "overrides")


def main(args) -> None:
    config = load_config(args.data, None, args.overrides)
    if args.drop_bad:
        config = config.model_copy(update={"data": config.data.model_copy(
            update={"drop_bad_images": True})})
    make_folds(config, force=args.force)
