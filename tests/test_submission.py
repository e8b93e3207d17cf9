"""Submissions follow the sample submission exactly; the validator names what differs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.base.config import load_config
from pipeline.ensembling.submission import (
    SubmissionError,
    build_submission,
    score_against_solution,
    validate_submission,
    write_submission,
)


def write_data(tmp_path, classes, sample: pd.DataFrame | None,
               solution: pd.DataFrame | None = None, **extra):
    """A competition config with only what submissions need: a sample (and a solution)."""
    root = tmp_path / "comp"
    root.mkdir(parents=True, exist_ok=True)
    if sample is not None:
        sample.to_csv(root / "sample_submission.csv", index=False)
    mapping = {"name": "comp", "root": str(root), "classes": classes, **extra}
    if solution is not None:
        solution.to_csv(root / "solution.csv", index=False)
        mapping["solution_csv"] = "solution.csv"
    path = root / "comp.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return load_config(str(path), None, []).data


IDS = ["0001", "0002", "0010", "0003"]


@pytest.fixture
def label_data(tmp_path):
    return write_data(tmp_path, ["cat", "dog"], pd.DataFrame({"id": IDS, "label": "cat"}))


def test_build_reorders_to_the_sample_and_keeps_leading_zeros(label_data, tmp_path):
    predicted_ids = ["0003", "0010", "0002", "0001"]  # the sample's ids, another order
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    frame = build_submission(label_data, predicted_ids, probs)
    assert frame["id"].tolist() == IDS
    assert frame["label"].tolist() == ["dog", "cat", "dog", "cat"]
    path = write_submission(frame, tmp_path / "sub.csv", label_data)
    assert path.read_text().splitlines() == ["id,label", "0001,dog", "0002,cat", "0010,dog",
                                             "0003,cat"]


def test_labels_as_indices_or_names(label_data):
    by_index = build_submission(label_data, IDS, np.array([1, 0, 0, 1]))
    by_name = build_submission(label_data, IDS, ["dog", "cat", "cat", "dog"])
    assert by_index.equals(by_name)
    with pytest.raises(SubmissionError, match=r"labels fox are not in the class list"):
        build_submission(label_data, IDS, ["dog", "cat", "fox", "dog"])


def test_build_refuses_other_test_ids(label_data):
    with pytest.raises(SubmissionError) as err:
        build_submission(label_data, ["0001", "0002", "0010", "9999"], np.eye(2)[[0, 1, 0, 1]])
    assert "no prediction for 0003" in str(err.value) and "not in the sample: 9999" in str(err.value)


def valid_frame():
    return pd.DataFrame({"id": IDS, "label": ["cat", "dog", "dog", "cat"]})


def test_validator_rejects_a_wrong_id_set(label_data):
    frame = valid_frame()
    frame.loc[2, "id"] = "10"  # the zeros lost: 0010 -> 10
    with pytest.raises(SubmissionError) as err:
        validate_submission(frame, label_data)
    message = str(err.value)
    assert "wrong id set: 1 id(s) of the sample are missing: 0010" in message
    assert "wrong id set: 1 id(s) are not in the sample: 10" in message


def test_validator_rejects_wrong_order_and_row_count(label_data):
    with pytest.raises(SubmissionError, match=r"wrong order: row 1 has id '0002' where the sample "
                                              r"has '0001'"):
        validate_submission(valid_frame().iloc[[1, 0, 2, 3]], label_data)
    with pytest.raises(SubmissionError, match=r"3 rows; the sample submission has 4"):
        validate_submission(valid_frame().iloc[:3], label_data)


def test_validator_rejects_nan_and_unknown_labels(label_data):
    frame = valid_frame()
    frame.loc[1, "label"] = np.nan
    frame.loc[3, "label"] = "fox"
    with pytest.raises(SubmissionError) as err:
        validate_submission(frame, label_data)
    message = str(err.value)
    assert "missing values (NaN or empty) in column(s) ['label'] for id(s) 0002" in message
    assert "labels outside the class list ['cat', 'dog'] in column 'label': fox (1 rows)" in message


def test_validator_rejects_wrong_columns(label_data):
    with pytest.raises(SubmissionError, match=r"missing \['label'\], unexpected \['class'\]"):
        validate_submission(valid_frame().rename(columns={"label": "class"}), label_data)
    with pytest.raises(SubmissionError, match=r"columns are in the order \['label', 'id'\]"):
        validate_submission(valid_frame()[["label", "id"]], label_data)


def test_binary_string_classes_spelled_as_the_competition(tmp_path):
    # Leukaemia-style: classes ALL/HEM, the sample names its label column `class`.
    data = write_data(tmp_path, ["ALL", "HEM"], pd.DataFrame({"image": ["1.bmp", "2.bmp"],
                                                              "class": ["ALL", "ALL"]}),
                      id_column="image", label_column="class")
    frame = build_submission(data, ["1.bmp", "2.bmp"], np.array([[0.2, 0.8], [0.7, 0.3]]))
    write_submission(frame, tmp_path / "s.csv", data)
    assert (tmp_path / "s.csv").read_text() == "image,class\n1.bmp,HEM\n2.bmp,ALL\n"


def test_label_column_found_when_named_otherwise(tmp_path):
    data = write_data(tmp_path, [0, 1, 2], pd.DataFrame({"id": ["a", "b"], "Category": [0, 0]}))
    frame = build_submission(data, ["a", "b"], np.array([2, 1]))
    assert list(frame.columns) == ["id", "Category"] and frame["Category"].tolist() == ["2", "1"]


def test_probabilities_follow_the_sample_column_order(tmp_path):
    sample = pd.DataFrame({"id": ["0007", "0008"], "dog": 0.5, "cat": 0.5})
    data = write_data(tmp_path, ["cat", "dog"], sample, submission="probabilities")
    frame = build_submission(data, ["0008", "0007"], np.array([[0.9, 0.1], [0.25, 0.75]]))
    assert list(frame.columns) == ["id", "dog", "cat"]
    assert frame["id"].tolist() == ["0007", "0008"]
    assert np.allclose(frame[["cat", "dog"]].to_numpy(), [[0.25, 0.75], [0.9, 0.1]])
    write_submission(frame, tmp_path / "p.csv", data)
    assert (tmp_path / "p.csv").read_text().splitlines()[1].startswith("0007,0.75,0.25")

    frame.loc[0, "dog"] = 1.5
    with pytest.raises(SubmissionError, match=r"column 'dog' has probabilities outside \[0, 1\] "
                                              r"for id\(s\) 0007"):
        validate_submission(frame, data)


def test_write_leaves_nothing_when_invalid(label_data, tmp_path):
    with pytest.raises(SubmissionError):
        write_submission(valid_frame().iloc[:2], tmp_path / "bad.csv", label_data)
    assert list(tmp_path.glob("*bad*")) == []


def test_score_against_solution_labels_and_probabilities(tmp_path):
    ids = ["01", "02", "03", "04"]
    solution = pd.DataFrame({"id": ids, "label": ["cat", "dog", "dog", "cat"]})
    data = write_data(tmp_path / "a", ["cat", "dog"], pd.DataFrame({"id": ids, "label": "cat"}),
                      solution)
    frame = build_submission(data, ids, ["cat", "dog", "cat", "cat"])
    assert score_against_solution(data, frame) == pytest.approx(0.75)

    data = write_data(tmp_path / "b", ["cat", "dog"], pd.DataFrame({"id": ids, "cat": 0.5,
                                                                    "dog": 0.5}),
                      solution, submission="probabilities", metric="log_loss")
    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5], [0.9, 0.1]])
    frame = build_submission(data, ids, probs)
    expected = -np.mean(np.log([0.8, 0.6, 0.5, 0.9]))
    assert score_against_solution(data, frame) == pytest.approx(expected)


def test_no_solution_scores_none(label_data):
    assert score_against_solution(label_data, valid_frame()) is None
