"""Competition formats: submission kinds read off the sample's header, and data layouts with
{label} and other columns in the image path, or labels that are only folder names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from pipeline.base.config import ConfigError, load_config
from pipeline.base.task import positive_index
from pipeline.data import tables as data_module
from pipeline.data.checks import check_competition, check_sample_submission
from pipeline.data.tables import DataError, load_train_table
from pipeline.ensembling.submission import (
    SubmissionError,
    build_submission,
    resolved_submission_kind,
    score_against_solution,
    submission_kind,
    validate_submission,
    write_submission,
)
from tests.conftest import write_image
from tests.test_submission import write_data

IDS = ["0001", "0002", "0010", "0003"]


def competition(tmp_path, classes, sample: pd.DataFrame | None = None,
                solution: pd.DataFrame | None = None, **extra):
    """A competition config (and its sample and solution); return its DataConfig."""
    return write_data(tmp_path, classes, sample, solution, **extra)


# --------------------------------------------------------------------------------------------
# Submission kinds


@pytest.mark.parametrize("header, classes, metric, kind", [
    (["id", "cat", "dog", "fox"], ["cat", "dog", "fox"], "log_loss", "probabilities"),
    (["id", "dog", "cat"], ["cat", "dog"], "roc_auc", "probabilities"),  # any column order
    (["id", "target"], ["0", "1"], "roc_auc", "positive_probability"),
    (["id", "target"], ["0", "1"], "log_loss", "positive_probability"),
    (["id", "target"], ["0", "1"], "binary_f1", "label"),
    (["id", "label"], ["a", "b", "c"], "qwk", "label"),
])
def test_auto_reads_the_kind_off_the_header(tmp_path, header, classes, metric, kind):
    sample = pd.DataFrame({column: ["x1", "x2"] if column == "id" else "0" for column in header})
    data = competition(tmp_path, classes, sample, metric=metric)
    assert data.submission == "auto"
    assert submission_kind(data, sample.astype(str)) == kind
    assert resolved_submission_kind(data) == kind


def test_a_label_submission_for_a_probability_metric_is_refused(tmp_path):
    sample = pd.DataFrame({"id": IDS, "label": "a"})
    data = competition(tmp_path / "three", ["a", "b", "c"], sample, metric="log_loss")
    with pytest.raises(SubmissionError) as err:
        resolved_submission_kind(data)
    message = str(err.value)
    assert "data.metric is log_loss" in message and "submission: probabilities" in message
    assert "id,label" in message  # says where the kind came from

    binary = competition(tmp_path / "two", ["a", "b"], sample, metric="roc_auc",
                         submission="label")
    with pytest.raises(SubmissionError, match=r"submission: positive_probability \(one column "
                                              r"holding the probability of 'b'\)"):
        build_submission(binary, IDS, np.eye(2)[[0, 1, 0, 1]])


def test_an_unclear_header_names_the_columns(tmp_path):
    sample = pd.DataFrame({"id": IDS, "cat": 0.5, "dogs": 0.5})
    data = competition(tmp_path, ["cat", "dog"], sample, metric="log_loss")
    with pytest.raises(SubmissionError) as err:
        resolved_submission_kind(data)
    assert "classes without a column: ['dog']" in str(err.value)
    assert "columns that are no class: ['dogs']" in str(err.value)


def test_positive_probability_build_write_and_score(tmp_path):
    sample = pd.DataFrame({"image_name": IDS, "target": 0})
    solution = pd.DataFrame({"image_name": IDS, "label": ["benign", "malignant", "malignant",
                                                          "benign"]})
    data = competition(tmp_path, ["benign", "malignant"], sample, solution, metric="roc_auc",
                       id_column="image_name")
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.65, 0.35], [0.4, 0.6]])  # in IDS order
    frame = build_submission(data, IDS[::-1], probs[::-1])  # another order: follows the sample
    assert list(frame.columns) == ["image_name", "target"]
    assert frame["target"].tolist() == [0.1, 0.7, 0.35, 0.6]
    path = write_submission(frame, tmp_path / "sub.csv", data)
    assert path.read_text().splitlines() == ["image_name,target", "0001,0.1", "0002,0.7",
                                             "0010,0.35", "0003,0.6"]
    truth = np.array([0, 1, 1, 0])
    assert score_against_solution(data, frame) == pytest.approx(roc_auc_score(truth, probs[:, 1]))

    frame.loc[2, "target"] = 1.5
    with pytest.raises(SubmissionError, match=r"column 'target' has probabilities outside"):
        validate_submission(frame, data)


def test_positive_class_picks_the_submitted_column(tmp_path):
    sample = pd.DataFrame({"id": IDS, "target": 0})
    solution = pd.DataFrame({"id": IDS, "label": ["0", "1", "1", "0"]})
    data = competition(tmp_path, [0, 1], sample, solution, metric="log_loss", positive_class=0)
    assert data.positive_class == "0" and positive_index(data) == 0
    probs = np.array([[0.8, 0.2], [0.1, 0.9], [0.3, 0.7], [0.6, 0.4]])
    frame = build_submission(data, IDS, probs)
    assert frame["target"].tolist() == [0.8, 0.1, 0.3, 0.6]  # p(class 0)
    expected = -np.mean(np.log([0.8, 0.9, 0.7, 0.6]))
    assert score_against_solution(data, frame) == pytest.approx(expected)


def test_positive_probability_log_loss_is_clipped(tmp_path):
    sample = pd.DataFrame({"id": IDS[:2], "target": 0})
    solution = pd.DataFrame({"id": IDS[:2], "label": ["no", "yes"]})
    data = competition(tmp_path, ["no", "yes"], sample, solution, metric="log_loss")
    frame = build_submission(data, IDS[:2], np.array([[0.0, 1.0], [0.0, 1.0]]))  # one sure miss
    assert score_against_solution(data, frame) == pytest.approx(-np.log(1e-15) / 2, rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    ({"positive_class": "c"}, r"positive_class 'c' is not one of the classes"),
    ({"classes": ["a", "b", "c"], "positive_class": "a"}, r"needs exactly two classes"),
    ({"classes": ["a", "b", "c"], "submission": "positive_probability"},
     r"submission: positive_probability needs exactly two classes"),
])
def test_binary_settings_are_validated(tmp_path, extra, message):
    mapping = {"name": "x", "root": str(tmp_path), "classes": ["a", "b"], **extra}
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(mapping))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_check_reports_the_kind_and_checks_class_columns(tmp_path):
    sample = pd.DataFrame({"id": IDS, "a": 0.5, "b": 0.5, "c": 0.0})
    data = competition(tmp_path, ["a", "b", "c"], sample, metric="log_loss", test_csv=None)
    assert check_sample_submission(data, IDS) == "probabilities"
    explicit = competition(tmp_path / "x", ["a", "b", "d"], sample, metric="log_loss",
                           submission="probabilities", test_csv=None)
    with pytest.raises(SubmissionError, match=r"classes without a column: \['d'\]"):
        check_sample_submission(explicit, IDS)


# --------------------------------------------------------------------------------------------
# Data layouts


def layout(tmp_path, train: pd.DataFrame, test: pd.DataFrame | None, paths: dict[str, str],
           **config) -> object:
    """Images at the given relative paths (train/..., test/...), the CSVs and a config."""
    root = tmp_path / "comp"
    for i, relative in enumerate(paths.values()):
        write_image((root / relative).with_suffix(""), seed=i, ext=Path(relative).suffix)
    if train is not None:
        train.to_csv(root / "train.csv", index=False)
    if test is not None:
        test.to_csv(root / "test.csv", index=False)
        sample_ids = test["id"]
    else:
        sample_ids = [p.split("/")[-1].split(".")[0] for p in paths.values() if p.startswith("test/")]
    pd.DataFrame({"id": sample_ids, "label": "a"}).to_csv(root / "sample_submission.csv",
                                                          index=False)
    mapping = {"name": "comp", "root": str(root), "classes": ["a", "b"], **config}
    path = root / "comp.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return load_config(str(path)).data


def test_label_folders_with_a_train_csv(tmp_path):
    train = pd.DataFrame({"id": ["x1", "x2", "x3"], "label": ["a", "b", "a"]})
    test = pd.DataFrame({"id": ["t1"]})
    data = layout(tmp_path, train, test,
                  {"1": "train/a/x1.png", "2": "train/b/x2.png", "3": "train/a/x3.png",
                   "4": "test/t1.png"},
                  image_path="{label}/{id}.png", test_image_path="{id}.png")
    result = check_competition(data, workers=1)
    assert result.train["label"].tolist() == ["a", "b", "a"]
    root = data.root_path
    assert data_module.train_image_paths(data, ["x2", "x1"]) == [root / "train/b/x2.png",
                                                                   root / "train/a/x1.png"]
    assert data_module.test_image_paths(data, ["t1"]) == [root / "test/t1.png"]


def test_label_in_the_test_path_is_refused_with_the_remedy(tmp_path):
    train = pd.DataFrame({"id": ["x1", "x2"], "label": ["a", "b"]})
    data = layout(tmp_path, train, pd.DataFrame({"id": ["t1"]}),
                  {"1": "train/a/x1.png", "2": "train/b/x2.png", "3": "test/t1.png"},
                  image_path="{label}/{id}.png")
    with pytest.raises(DataError) as err:
        check_competition(data, workers=1)
    message = str(err.value)
    assert "test.csv lacks" in message and "['label']" in message
    assert "data.test_image_path" in message


def test_other_columns_in_the_path(tmp_path):
    train = pd.DataFrame({"id": ["e1", "e2", "e3"], "label": ["a", "b", "b"],
                          "patient": ["p7", "p7", "p9"]})
    test = pd.DataFrame({"id": ["t1", "t2"], "patient": ["p3", "p4"]})
    data = layout(tmp_path, train, test,
                  {"1": "train/p7/e1.jpg", "2": "train/p7/e2.jpg", "3": "train/p9/e3.jpg",
                   "4": "test/p3/t1.jpg", "5": "test/p4/t2.jpg"},
                  image_path="{patient}/{id}.jpg")
    result = check_competition(data, workers=1)
    assert len(result.train) == 3 and result.test_ids == ["t1", "t2"]
    root = data.root_path
    assert data_module.train_image_paths(data, ["e3"]) == [root / "train/p9/e3.jpg"]
    assert data_module.test_image_paths(data) == [root / "test/p3/t1.jpg", root / "test/p4/t2.jpg"]

    test.drop(columns="patient").to_csv(root / "test.csv", index=False)
    with pytest.raises(DataError, match=r"test.csv lacks .*\['id'\]\); the test set has no labels"):
        data_module.test_image_paths(data)


def test_a_field_cannot_escape_the_image_folder(tmp_path):
    train = pd.DataFrame({"id": ["e1", "e2"], "label": ["a", "b"], "patient": ["p1", "../../etc"]})
    data = layout(tmp_path, train, pd.DataFrame({"id": ["t1"], "patient": ["p1"]}),
                  {"1": "train/p1/e1.png", "2": "test/p1/t1.png"}, image_path="{patient}/{id}.png")
    with pytest.raises(DataError, match=r"id\(s\) e2 would point outside the image folder"):
        data_module.train_image_paths(data, ["e1", "e2"])


def test_an_id_with_dots_cannot_escape_a_label_folder(tmp_path):
    train = pd.DataFrame({"id": ["x1", "../../../secret"], "label": ["a", "b"]})
    data = layout(tmp_path, train, pd.DataFrame({"id": ["t1"]}),
                  {"1": "train/a/x1.png", "2": "test/t1.png"},
                  image_path="{label}/{id}.png", test_image_path="{id}.png")
    with pytest.raises(DataError, match=r"\.\./\.\./\.\./secret would point outside"):
        check_competition(data, workers=1)


def test_image_paths_keeps_its_signature_for_id_patterns(tmp_path):
    folder = tmp_path / "train"
    assert data_module.image_paths(folder, "{id}.jpeg", ["0001"]) == [folder / "0001.jpeg"]
    with pytest.raises(DataError, match=r"uses \['label'\], which ids alone do not give"):
        data_module.image_paths(folder, "{label}/{id}.png", ["0001"])


FOLDERS = {"1": "train/a/img1.png", "2": "train/a/img2.png", "3": "train/b/img3.png",
           "4": "train/b/img4.png", "5": "test/t1.png", "6": "test/t2.png"}


def test_labels_from_folder_names(tmp_path):
    data = layout(tmp_path, None, None, FOLDERS, train_csv=None, test_csv=None,
                  image_path="{label}/{id}.png", test_image_path="{id}.png",
                  group_pattern=r"^img(\d)")
    (data.root_path / "train" / "a" / "notes.txt").write_text("not an image")
    table = load_train_table(data)
    assert table["id"].tolist() == ["img1", "img2", "img3", "img4"]  # ids are the file stems
    assert table["label"].tolist() == ["a", "a", "b", "b"]
    assert table["target"].tolist() == [0, 0, 1, 1]
    assert table["group"].tolist() == ["1", "2", "3", "4"]
    result = check_competition(data, workers=1)
    assert result.test_ids == ["t1", "t2"] and len(result.train) == 4
    assert data_module.train_image_paths(data, ["img3"]) == [data.root_path / "train/b/img3.png"]


def test_folder_names_outside_the_classes_are_named(tmp_path):
    data = layout(tmp_path, None, None, {**FOLDERS, "7": "train/zebra/img9.png"}, train_csv=None,
                  test_csv=None, image_path="{label}/{id}.png", test_image_path="{id}.png")
    with pytest.raises(DataError, match=r"folder\(s\) zebra are not in the class list"):
        load_train_table(data)


def test_an_id_under_two_class_folders_is_named(tmp_path):
    data = layout(tmp_path, None, None, {**FOLDERS, "7": "train/b/img1.png"}, train_csv=None,
                  test_csv=None, image_path="{label}/{id}.png", test_image_path="{id}.png")
    with pytest.raises(DataError, match=r"id\(s\) found under several class folders: img1 \(a, b\)"):
        load_train_table(data)


def test_empty_class_folders_are_an_error(tmp_path):
    data = layout(tmp_path, None, None, {"1": "test/t1.png"}, train_csv=None, test_csv=None,
                  image_path="{label}/{id}.png", test_image_path="{id}.png")
    (data.root_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no image fits '\{label\}/\{id\}.png'"):
        load_train_table(data)


@pytest.mark.parametrize("settings, message", [
    ({"train_csv": None, "image_path": "{id}.png"}, r"image_path needs '\{label\}'"),
    ({"train_csv": None, "image_path": "{label}/{patient}/{id}.png"},
     r"no columns for image_path fields \['patient'\]"),
    ({"train_csv": None, "image_path": "{label}/{id}.png", "group_column": "patient"},
     r"use group_pattern, not group_column"),
    ({"image_path": "{label}/image.png"}, r"must contain '\{id\}'"),
    ({"image_path": "{}/{id}.png"}, r"must name a column"),
    ({"image_path": "{id.png"}, r"not a valid path pattern"),
    ({"test_image_path": "{label}.png"}, r"test_image_path.*must contain '\{id\}'"),
])
def test_path_patterns_are_validated(tmp_path, settings, message):
    mapping = {"name": "x", "root": str(tmp_path), "classes": ["a", "b"], **settings}
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(mapping))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))
