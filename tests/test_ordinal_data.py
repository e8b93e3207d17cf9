"""The benchmark's ordinal competition (bench/ordinal_data.py): it exports a Kaggle-style folder
and config the pipeline reads, in the retina grade shares, two eyes per patient, deterministically,
with the grade visible in the images."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from bench.ordinal_data import SHARES, export_ordinal, grade_counts
from pipeline.base.config import load_config
from pipeline.stages.folds import make_folds


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "ordinal"
    return export_ordinal(root, n=300, seed=0), root


def read(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_it_exports_a_competition_the_pipeline_reads(exported, tmp_path):
    config_path, root = exported
    assert config_path == root.parent / "ordinal.yaml"
    train, test = read(root / "train.csv"), read(root / "test.csv")
    sample, solution = read(root / "sample_submission.csv"), read(root / "solution.csv")
    assert list(train.columns) == ["image", "level"] and len(train) == 300
    assert len(test) == 100
    assert list(sample["image"]) == list(test["image"]) == list(solution["image"])
    assert set(sample["level"]) == {"0"} and set(solution["level"]) <= set("01234")
    assert sorted(p.stem for p in (root / "train").glob("*.png")) == sorted(train["image"])
    assert sorted(p.stem for p in (root / "test").glob("*.png")) == sorted(test["image"])
    image = cv2.imread(str(root / "train" / f"{train['image'][0]}.png"))
    assert image.shape == (32, 32, 3)

    config = load_config(str(config_path), None, [f"folds.dir={tmp_path}", "folds.n_splits=3",
                                                  f"runs_dir={tmp_path / 'runs'}",
                                                  f"audit_dir={tmp_path / 'audit'}"])
    data = config.data
    assert (data.metric, data.ordinal, data.classes) == ("qwk", True, ["0", "1", "2", "3", "4"])
    folds = make_folds(config)  # the pipeline's check of every image and label runs first
    assert len(folds) == 300
    assert folds.groupby("group")["fold"].nunique().max() == 1  # both eyes in one fold


def test_grade_shares_are_within_two_points_of_the_retina_data(exported):
    _, root = exported
    for name in ("train.csv", "solution.csv"):
        shares = read(root / name)["level"].astype(int).value_counts(normalize=True)
        for grade, target in enumerate(SHARES):
            assert abs(shares.get(grade, 0) - target) <= 0.02, (name, grade, shares.get(grade))
    assert list(grade_counts(900)) == [657, 63, 135, 23, 22]  # exact, largest remainder


def test_the_eyes_pair_up_into_patients(exported):
    _, root = exported
    train, test = read(root / "train.csv"), read(root / "solution.csv")
    for table in (train, test):
        parts = table["image"].str.extract(r"^(\d+)_(left|right)$")
        assert parts.notna().all().all()  # every id is <patient>_left or <patient>_right
        eyes = parts.groupby(0)[1].apply(sorted)
        assert all(e == ["left", "right"] for e in eyes)  # each patient: one left, one right
    patients = [set(t["image"].str.split("_").str[0]) for t in (train, test)]
    assert not patients[0] & patients[1]  # no patient in both train and test
    levels = train["level"].astype(int).to_numpy().reshape(-1, 2)  # rows are left, right
    assert (levels[:, 0] == levels[:, 1]).mean() > 0.6  # correlated eyes
    assert np.abs(levels[:, 0] - levels[:, 1]).max() <= 2


def test_the_grade_is_visible_in_the_images(exported):
    """Red lesions: their area grows with the grade (noise aside), grade by grade."""
    _, root = exported
    train = read(root / "train.csv")
    redness = []
    for image_id in train["image"]:
        bgr = cv2.imread(str(root / "train" / f"{image_id}.png")).astype(float)
        redness.append(np.clip(bgr[..., 2] - 1.6 * bgr[..., 1] - 20, 0, None).sum())
    means = pd.Series(redness).groupby(train["level"].astype(int)).median()
    assert list(means.index) == [0, 1, 2, 3, 4]
    assert means.is_monotonic_increasing and means[4] > 3 * means[1]


def test_the_same_seed_gives_the_same_files(tmp_path):
    first = export_ordinal(tmp_path / "a" / "comp", n=40, seed=3).parent / "comp"
    second = export_ordinal(tmp_path / "b" / "comp", n=40, seed=3).parent / "comp"
    other = export_ordinal(tmp_path / "c" / "comp", n=40, seed=4).parent / "comp"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert (first / "train.csv").read_bytes() != (other / "train.csv").read_bytes()
    with pytest.raises(ValueError, match="even"):
        export_ordinal(tmp_path / "odd", n=41)
