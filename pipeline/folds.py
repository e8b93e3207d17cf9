"""Stratified K folds of the labelled rows, written once to folds/folds.csv.

    python -m pipeline folds --data digits        # make folds

Uses StratifiedKFold, or StratifiedGroupKFold when the competition names a group (both eyes of
one patient stay in one fold). Every later stage reads folds.csv and never re-splits. The data is
checked first (see check.py), so bad data stops here, before any training.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.check import check_competition
from pipeline.config import Config
from pipeline.data import load_train_table
from pipeline.utils import PipelineError, format_table, warn, write_csv_atomic


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
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(table, table["target"], groups=table["group"])
    else:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(table, table["target"])
    fold = np.full(len(table), -1, dtype=np.int64)
    for k, (_, valid_idx) in enumerate(splits):
        fold[valid_idx] = k
    columns = ["id", "label", "fold"] + (["group"] if "group" in table else [])
    return table.assign(fold=fold)[columns]


def fold_table(folds: pd.DataFrame, classes: list[str]) -> str:
    """Per fold: size and the count of each class."""
    rows = []
    for k, part in folds.groupby("fold"):
        counts = part["label"].value_counts()
        rows.append([int(k), len(part), *[int(counts.get(c, 0)) for c in classes]])
    counts = folds["label"].value_counts()
    rows.append(["all", len(folds), *[int(counts.get(c, 0)) for c in classes]])
    return format_table(rows, ["fold", "images", *classes])


def make_folds(config: Config, drop_bad: bool | None = None) -> pd.DataFrame:
    result = check_competition(config.data, drop_bad=drop_bad)
    folds = assign_folds(result.train, config.folds.n_splits, config.folds.seed)
    write_csv_atomic(folds, config.folds_csv)
    if result.dropped:
        dropped = pd.DataFrame({"id": list(result.dropped), "problem": list(result.dropped.values())})
        write_csv_atomic(dropped, config.folds_csv.with_name("dropped.csv"))
    print(fold_table(folds, config.data.classes))
    print(f"wrote {config.folds_csv} ({len(folds)} images, {config.folds.n_splits} folds"
          f"{', grouped' if 'group' in folds else ''})")
    return folds


def read_folds(config: Config) -> pd.DataFrame:
    """folds.csv with ids as strings; tells the user to run `make folds` when it is missing."""
    path = config.folds_csv
    if not path.is_file():
        raise PipelineError(f"{path} not found: run `make folds DATA={config.data.name}` first")
    folds = pd.read_csv(path, dtype={"id": str, "label": str, "group": str}, keep_default_na=False)
    unknown = sorted(set(folds["label"]) - set(config.data.classes))
    if unknown:
        raise PipelineError(f"{path} has labels {unknown} outside the class list of "
                            f"{config.data.name}: it was made for another competition; "
                            f"run `make folds DATA={config.data.name}`")
    index = {name: i for i, name in enumerate(config.data.classes)}
    return folds.assign(target=folds["label"].map(index).astype(np.int64))


def _existing_folds_fit(config: Config) -> bool:
    """True when folds.csv was made for this competition's rows and fold count."""
    existing = pd.read_csv(config.folds_csv, dtype={"id": str}, keep_default_na=False)
    train_ids = set(load_train_table(config.data)["id"])
    return (existing["fold"].nunique() == config.folds.n_splits
            and set(existing["id"]) <= train_ids and len(existing) > 0)


def main(args) -> None:
    from pipeline.config import load_config

    config = load_config(args.data, None, args.overrides)
    if config.folds_csv.is_file() and not args.force:
        if _existing_folds_fit(config):
            print(f"{config.folds_csv} exists and fits {config.data.name}; FORCE=1 re-splits")
            return
        warn(f"{config.folds_csv} was made for other rows or another fold count: re-splitting")
    make_folds(config, drop_bad=args.drop_bad or None)
