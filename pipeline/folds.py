"""Stratified K folds of the labelled rows, written once to folds/<competition>.csv.

    python -m pipeline folds --data digits        # make folds

Uses StratifiedKFold, or StratifiedGroupKFold when the competition names a group (both eyes of
one patient stay in one fold). Every later stage reads the folds file and never re-splits. The
data is checked first (see check.py), so bad data stops here, before any training.

The manifest beside it (folds/<competition>.manifest.json) records the labelled rows, the
training images and the fold settings it was made from: `make folds` splits again when one of
them changed (a fixed label, added rows, another n_splits), and every later stage refuses folds
that no longer fit the data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pathlib import Path

from pipeline.check import check_competition
from pipeline.config import Config
from pipeline.data import load_train_table, train_image_paths
from pipeline.provenance import (Freshness, fingerprint, folds_fingerprint, freshness,
                                 images_fingerprint, rows_fingerprint, write_manifest)
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


def fold_inputs(config: Config, table: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """(input fingerprints, readable details) of the folds stage, from the files as they are now.

    Reads train.csv and stats every labelled image (no decoding): cheap enough for every stage
    that reads the folds to ask whether they still fit the data.
    """
    data = config.data
    table = load_train_table(data) if table is None else table
    settings = {"n_splits": config.folds.n_splits, "seed": config.folds.seed,
                "group_column": data.group_column, "group_pattern": data.group_pattern,
                "drop_bad_images": data.drop_bad_images}
    paths = train_image_paths(data, table["id"].tolist())
    inputs = {"rows": rows_fingerprint(table, data.classes),
              "train_images": images_fingerprint(table["id"].tolist(), paths),
              "fold_settings": fingerprint(settings)}
    return inputs, {"settings": settings, "rows": len(table)}


def folds_manifest(config: Config) -> Path:
    return config.folds_csv.with_suffix(".manifest.json")


def make_folds(config: Config, drop_bad: bool | None = None) -> pd.DataFrame:
    """Check the data, split it, write folds/<competition>.csv and, last, its manifest."""
    if drop_bad is not None and drop_bad != config.data.drop_bad_images:
        config = config.model_copy(update={"data": config.data.model_copy(
            update={"drop_bad_images": drop_bad})})
    inputs, details = fold_inputs(config)
    result = check_competition(config.data)
    folds = assign_folds(result.train, config.folds.n_splits, config.folds.seed)
    write_folds(config, folds, result.dropped, (inputs, details))
    print(fold_table(folds, config.data.classes))
    print(f"wrote {config.folds_csv} ({len(folds)} images, {config.folds.n_splits} folds"
          f"{', grouped' if 'group' in folds else ''}"
          f"{f', {len(result.dropped)} bad image(s) left out' if result.dropped else ''})")
    return folds


def write_folds(config: Config, folds: pd.DataFrame, dropped: dict[str, str] | None = None,
                inputs: tuple[dict, dict] | None = None) -> None:
    """Write a fold assignment (id, label, fold[, group]) and, last, its manifest.

    Also the way in for folds made elsewhere (a public kernel's split): written through here they
    carry the fingerprints of the data as it is now, like folds this stage made.
    """
    inputs, details = inputs or fold_inputs(config)
    dropped = dropped or {}
    dropped_path = config.folds_csv.with_suffix(".dropped.csv")
    columns = ["id", "label", "fold"] + (["group"] if "group" in folds else [])
    write_csv_atomic(folds[columns], config.folds_csv)
    outputs = [config.folds_csv]
    if dropped:
        frame = pd.DataFrame({"id": list(dropped), "problem": list(dropped.values())})
        write_csv_atomic(frame, dropped_path)
        outputs.append(dropped_path)
    else:
        dropped_path.unlink(missing_ok=True)
    details = {**details, "images": len(folds), "dropped": len(dropped),
               "folds": folds_fingerprint(folds)}
    write_manifest(folds_manifest(config), "folds", inputs, outputs, details)


def folds_freshness(config: Config) -> Freshness:
    inputs, details = fold_inputs(config)
    return freshness(folds_manifest(config), inputs, details)


def read_folds(config: Config) -> pd.DataFrame:
    """folds/<competition>.csv with ids as strings, refused unless it fits the data as it is now.

    A train.csv edited since `make folds` (a fixed label, new rows), other fold settings or
    changed training images make the folds stale: every stage that reads them stops here and
    says so, instead of training on the old labels.
    """
    path = config.folds_csv
    if not path.is_file():
        hint = ""
        if (path.parent / "folds.csv").is_file():
            hint = (f" ({path.parent / 'folds.csv'} is of the old layout, shared by every "
                    f"competition; it is not read)")
        raise PipelineError(f"{path} not found{hint}: run `make folds DATA={config.data.name}` first")
    fresh = folds_freshness(config)
    if not fresh.current:
        raise PipelineError(f"{path} does not fit {config.data.name} as it is now: {fresh.why()}. "
                            f"Run `make folds DATA={config.data.name}` to split again (add "
                            f"ARGS=data.drop_bad_images=true to leave bad images out); runs "
                            f"trained on the old folds are then reported as stale")
    folds = pd.read_csv(path, dtype={"id": str, "label": str, "group": str}, keep_default_na=False)
    index = {name: i for i, name in enumerate(config.data.classes)}
    return folds.assign(target=folds["label"].map(index).astype(np.int64))


def main(args) -> None:
    from pipeline.config import load_config

    config = load_config(args.data, None, args.overrides)
    if args.drop_bad:
        config = config.model_copy(update={"data": config.data.model_copy(
            update={"drop_bad_images": True})})
    if not args.force:
        fresh = folds_freshness(config)
        if fresh.current:
            print(f"{config.folds_csv} is current for {config.data.name} (FORCE=1 splits again)")
            return
        if fresh.state == "stale":
            print(f"{config.folds_csv}: {fresh.why()}: splitting again")
    make_folds(config)
