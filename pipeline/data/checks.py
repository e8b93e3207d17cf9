"""Pre-flight check of a competition's files, run before any expensive work.

    result = check_competition(config.data)       # what `make check` and `make folds` run
    checked = Checked(config.data)                # once for every step of one command
    checked(survey=True).survey                   # and what the read told: pipeline/data/survey.py

Finds missing columns, duplicated ids, labels outside the class list, ids that escape the image
folder, missing images and unreadable or truncated images, and reports each kind with the first
few offenders and the count. With `data.drop_bad_images=true` (or `--drop-bad`), bad *training*
images are left out and listed instead; a bad test image is always an error (the submission needs
every test row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.base.config import DataConfig
from pipeline.base.utils import summarize_offenders, warn
from pipeline.data.images import inspect_images
from pipeline.data.survey import Survey, survey_image
from pipeline.data.tables import (
    DataError,
    load_test_ids,
    load_train_table,
    read_table,
    test_image_dir,
    test_image_paths,
    train_image_dir,
    train_image_paths,
)
from pipeline.ensembling.submission import (
    label_column_of,
    probability_columns_of,
    submission_kind,
)


@dataclass
class CheckResult:
    train: pd.DataFrame  # id, label, target[, group]: the usable labelled rows
    test_ids: list[str]
    dropped: dict[str, str] = field(default_factory=dict)  # training id -> what was wrong
    submission: str = "label"  # the submission kind: label, probabilities, positive_probability
    # what the read of every image that read cleanly (train and test) told, when surveyed
    survey: Survey | None = None


class Checked:
    """check_competition once for all the steps of one command (`make folds`: its duplicate
    pass and its split): a step that needs the survey gets it, checking again only when an
    earlier step checked without it."""

    def __init__(self, data: DataConfig):
        self.data, self.result = data, None

    def __call__(self, survey: bool = False) -> CheckResult:
        if self.result is None or (survey and self.result.survey is None):
            self.result = check_competition(self.data, survey=survey)
        return self.result


def _tqdm(desc: str):
    def wrap(iterable, total):
        return tqdm(iterable, total=total, desc=desc, unit="img", leave=False, mininterval=1.0)
    return wrap


def _group_problems(problems: dict[Path, str], ids_by_path: dict[Path, str]) -> dict[str, list[str]]:
    """{'missing': [id, ...], 'too large': ['id (W x H px)', ...], ...}, ids in path order; the
    kinds whose detail is short (a size, a link's target) name it beside the id."""
    grouped: dict[str, list[str]] = {}
    for path, problem in problems.items():
        kind, _, detail = problem.partition(": ")
        shown = f"{ids_by_path[path]} ({detail})" if kind in ("too large", "outside") else \
            ids_by_path[path]
        grouped.setdefault(kind, []).append(shown)
    return grouped


# How each kind of image problem (inspect_image's prefix) reads in the report, and its remedy.
PROBLEM_PHRASES = {
    "missing": ("missing images", ""),
    "unreadable": ("unreadable images", ""),
    "name too long": ("ids too long to be a file name",
                      " (a file system allows 255 bytes per name: shorten those ids in the CSV "
                      "and rename their files)"),
    "outside": ("links that lead outside the image folder",
                " (an image lives inside its folder: copy the file in, or point "
                "data.train_images / data.test_images at the folder it lives in)"),
    "too large": ("images over the pixel budget (data.max_image_pixels, read from their headers)",
                  " (shrink them, or raise data.max_image_pixels if they are real photos)"),
}


def _describe(where: str, folder: Path, grouped: dict[str, list[str]]) -> list[str]:
    lines = []
    for kind, ids in grouped.items():
        phrase, remedy = PROBLEM_PHRASES.get(kind, (kind, ""))
        lines.append(f"{where}: {phrase} in {folder}: {summarize_offenders(ids)}{remedy}")
    return lines


def check_sample_submission(data: DataConfig, test_ids: list[str]) -> str:
    """Check the sample's columns against the submission kind (read off its header when
    `data.submission` is auto) and its ids against the test CSV's; return the kind."""
    path = data.root_path / data.sample_submission
    sample = read_table(path, [data.id_column], data.id_column)
    kind = submission_kind(data, sample)
    if kind == "label":
        label_column_of(sample, data)
    elif kind == "probabilities":
        probability_columns_of(sample, data)
    if data.test_csv and set(sample[data.id_column]) != set(test_ids):
        only_sample = sorted(set(sample[data.id_column]) - set(test_ids))
        only_test = sorted(set(test_ids) - set(sample[data.id_column]))
        raise DataError(f"{path}: ids differ from {data.test_csv}: only in the sample submission: "
                        f"{summarize_offenders(only_sample) or '-'}; only in the test CSV: "
                        f"{summarize_offenders(only_test) or '-'}")
    return kind


def warn_empty_classes(data: DataConfig, train: pd.DataFrame) -> None:
    """A class of `classes` that no labelled row has: nothing to learn it from."""
    empty = [c for c in data.classes if c not in set(train["label"])]
    if empty:
        warn(f"class(es) {summarize_offenders(empty)} of the class list have no labelled row in "
             f"{data.train_csv or data.train_images}: the model learns nothing of them and will "
             f"hardly ever predict them. Remove them from `classes` in the competition config "
             f"unless the submission needs a column for them")


def bad_image_remedy(train: bool, test: bool) -> str:
    """The way out of bad training and/or test images: data.drop_bad_images leaves training
    rows out, never test rows (the submission needs a row for every test image)."""
    lines = []
    if train:
        lines.append("Bad training images: fix or replace the files, or set "
                     "data.drop_bad_images=true (--drop-bad) to leave them out.")
    if test:
        lines.append("Bad test images: fix or replace the files; they cannot be left out, since the "
                     "submission needs every test row (data.drop_bad_images applies to training "
                     "images only).")
    return "\n".join(lines)


def check_competition(data: DataConfig, drop_bad: bool | None = None,
                      workers: int | None = None, survey: bool = False) -> CheckResult:
    """Validate tables and images; return the usable rows or raise DataError naming every problem.
    With `survey`, the result holds what each image's read told too (pipeline/data/survey.py)."""
    drop_bad = data.drop_bad_images if drop_bad is None else drop_bad
    # a thread per core: reading a small image is mostly Python holding the GIL, so more threads
    # than cores were slower (35,000 24 px images: 1,470 img/s with 4 threads on 2 cores, 1,790
    # with 2); a large image's decode lets go of it, and a core each keeps them all busy
    workers = workers or min(8, os.cpu_count() or 1)
    train = load_train_table(data)
    test_ids = load_test_ids(data)
    submission = check_sample_submission(data, test_ids)

    train_dir, test_dir = train_image_dir(data), test_image_dir(data)
    train_paths = train_image_paths(data, train["id"].tolist())
    test_paths = test_image_paths(data, test_ids)
    budget, look = data.max_image_pixels, survey_image if survey else None
    train_bad, train_seen = inspect_images(train_paths, workers, _tqdm("check train images"),
                                           train_dir, max_pixels=budget, look=look)
    test_bad, test_seen = inspect_images(test_paths, workers, _tqdm("check test images"),
                                         test_dir, max_pixels=budget, look=look)

    train_grouped = _group_problems(train_bad, dict(zip(train_paths, train["id"])))
    test_grouped = _group_problems(test_bad, dict(zip(test_paths, test_ids)))
    errors = _describe("test", test_dir, test_grouped)
    if not drop_bad:
        errors = _describe("train", train_dir, train_grouped) + errors
    if errors:
        remedy = bad_image_remedy(bool(train_bad) and not drop_bad, bool(test_bad))
        raise DataError("bad data:\n  " + "\n  ".join(errors) + f"\n{remedy}")

    warn_empty_classes(data, train)
    dropped = {}
    if train_bad:
        ids_by_path = dict(zip(train_paths, train["id"]))
        dropped = {ids_by_path[p]: why for p, why in train_bad.items()}
        warn(f"dropped {len(dropped)} bad training image(s): {summarize_offenders(list(dropped))}")
        train = train[~train["id"].isin(dropped)].reset_index(drop=True)
    return CheckResult(train=train, test_ids=test_ids, dropped=dropped, submission=submission,
                       survey=Survey.of({**train_seen, **test_seen}) if survey else None)
