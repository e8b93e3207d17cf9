"""Submission files that follow the competition's `sample_submission.csv` exactly.

    python -m pipeline ensemble --data digits      # writes submissions/<name>.csv through this module

No verb of its own: the ensemble, predict and refit stages call

    frame = build_submission(data, test_ids, probs_or_labels)    # columns, ids and order of the sample
    write_submission(frame, path, data)                           # validates, then writes atomically
    score_against_solution(data, frame)                           # when data.solution_csv is known

The sample submission is the contract: the same columns in the same order, the same ids in the same
order, class names as the competition spells them (`data.classes`, strings, so `0001` stays `0001`
and a label `07` stays `07`). Anything else is refused with a message that names the offenders,
because Kaggle rejects (or silently mis-scores) such files only after the upload.

Three kinds of submission (`data.submission`; `auto`, the default, reads it off the sample's
header with `submission_kind`):

| kind                   | sample header  | a row holds                                          |
|------------------------|----------------|------------------------------------------------------|
| `label`                | id,label       | the predicted class, spelled as in `classes`         |
| `probabilities`        | id,cat,dog,fox | one probability per class, in the header's order     |
| `positive_probability` | id,target      | binary: the positive class's probability (the second |
|                        |                | of `classes`, or `data.positive_class`)              |

A label submission for a metric that scores probabilities (ROC-AUC, log-loss) is refused: Kaggle
would score each label as a probability of 0 or 1, which ruins either metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.base.config import DataConfig
from pipeline.base.metrics import one_hot, score
from pipeline.base.task import class_index, positive_index, targets_of
from pipeline.base.utils import PipelineError, summarize_offenders, write_csv_atomic
from pipeline.data.tables import read_table

# scored on hard labels; PROBABILITY_METRICS on probabilities
LABEL_METRICS = ("accuracy", "macro_f1", "weighted_f1", "binary_f1", "qwk")
PROBABILITY_METRICS = ("roc_auc", "log_loss")


class SubmissionError(PipelineError):
    """A submission does not match the sample submission; the message names what differs."""


# --------------------------------------------------------------------------------------------
# The sample submission


def sample_path(data: DataConfig) -> Path:
    return data.root_path / data.sample_submission


def read_sample(data: DataConfig) -> pd.DataFrame:
    """The sample submission with every column as a string (ids like 0001 keep their zeros)."""
    return read_table(sample_path(data), [data.id_column], data.id_column)


def _header_kind(data: DataConfig, sample: pd.DataFrame) -> str:
    """`auto`: a column per class -> probabilities; one column -> positive_probability for a
    binary competition scored on probabilities, else label."""
    others = [c for c in sample.columns if c != data.id_column]
    header = ",".join(sample.columns)
    if not others:
        raise SubmissionError(f"{sample_path(data)}: header {header!r} has no column besides the "
                              f"id column {data.id_column!r}; check data.id_column and the file")
    if len(others) == 1:
        binary_probability = len(data.classes) == 2 and data.metric in PROBABILITY_METRICS
        return "positive_probability" if binary_probability else "label"
    gaps = class_column_gaps(others, data.classes)
    if gaps:
        raise SubmissionError(
            f"{sample_path(data)}: cannot tell the submission kind from header {header!r}: "
            f"neither one label column nor one column per class of {data.classes} ({gaps}). "
            f"Make data.classes spell the classes as the header does, or set data.submission.")
    return "probabilities"


def class_column_gaps(columns: list[str], classes: list[str]) -> str | None:
    """Where a header's prediction columns and the class list differ, in words; None if equal."""
    missing = [c for c in classes if c not in columns]
    extra = [c for c in columns if c not in classes]
    if not missing and not extra:
        return None
    return (f"classes without a column: {missing or '-'}; columns that are no class: "
            f"{extra or '-'}")


def submission_kind(data: DataConfig, sample: pd.DataFrame) -> str:
    """label, probabilities or positive_probability: `data.submission`, or read off the sample's
    header when it is `auto`. Refuses a label submission for a metric scored on probabilities and
    a positive_probability submission whose sample has more than one prediction column."""
    kind = data.submission if data.submission != "auto" else _header_kind(data, sample)
    others = [c for c in sample.columns if c != data.id_column]
    if kind == "label" and data.metric in PROBABILITY_METRICS:
        how = "data.submission" if data.submission == "label" else \
            f"read off the header {','.join(sample.columns)!r} of {sample_path(data)}"
        binary = (f" or submission: positive_probability (one column holding the probability "
                  f"of {data.classes[positive_index(data)]!r})" if len(data.classes) == 2 else "")
        raise SubmissionError(
            f"data.metric is {data.metric}, which scores probabilities, but the submission is one "
            f"label per row ({how}): each label would count as a probability of 0 or 1. Set "
            f"data.submission: probabilities (one column per class){binary} in the competition "
            f"config, or check data.metric.")
    if kind == "positive_probability" and len(others) != 1:
        raise SubmissionError(
            f"{sample_path(data)}: a positive_probability submission has one column besides "
            f"{data.id_column!r}, the header has {others}; set data.submission: probabilities "
            f"(a column per class) or auto")
    return kind


def resolved_submission_kind(data: DataConfig) -> str:
    """The submission kind of a competition (see `submission_kind`), reading its sample."""
    return submission_kind(data, read_sample(data))


def prediction_column_of(sample: pd.DataFrame, data: DataConfig) -> str:
    """positive_probability: the sample's one column besides the id (e.g. `target`)."""
    return next(c for c in sample.columns if c != data.id_column)


def label_column_of(sample: pd.DataFrame, data: DataConfig) -> str:
    """The sample's label column: `data.label_column` when present, else its only non-id column."""
    if data.label_column in sample.columns:
        return data.label_column
    others = [c for c in sample.columns if c != data.id_column]
    if len(others) == 1:
        return others[0]
    raise SubmissionError(f"{sample_path(data)}: cannot tell the label column among {others}; "
                          f"set data.label_column to one of them")


def probability_columns_of(sample: pd.DataFrame, data: DataConfig) -> list[str]:
    """The sample's class columns, in the sample's order; they must be exactly `data.classes`."""
    columns = [c for c in sample.columns if c != data.id_column]
    gaps = class_column_gaps(columns, data.classes)
    if gaps:
        raise SubmissionError(
            f"{sample_path(data)}: a probabilities submission needs one column per class; "
            f"{gaps}. Make data.classes spell the classes as the sample's header does.")
    return columns


# --------------------------------------------------------------------------------------------
# Building


def _labels_as_classes(predictions: np.ndarray, classes: list[str]) -> np.ndarray:
    """Class names from probabilities (N, C) (argmax), class indices (N,) or class names (N,)."""
    if predictions.ndim == 2:
        if predictions.shape[1] != len(classes):
            raise SubmissionError(f"predictions have {predictions.shape[1]} columns but the "
                                  f"competition has {len(classes)} classes {classes}")
        return np.asarray(classes, dtype=object)[predictions.argmax(axis=1)]
    if np.issubdtype(predictions.dtype, np.floating):
        raise SubmissionError(f"got one float per row; pass (N, {len(classes)}) probabilities, "
                              f"class indices (integers) or class names")
    if np.issubdtype(predictions.dtype, np.integer):
        bad = sorted({int(i) for i in predictions if not 0 <= i < len(classes)})
        if bad:
            raise SubmissionError(f"class indices {summarize_offenders(bad)} are outside "
                                  f"0..{len(classes) - 1} ({classes})")
        return np.asarray(classes, dtype=object)[predictions]
    names = predictions.astype(str).astype(object)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise SubmissionError(f"labels {summarize_offenders(unknown)} are not in the class list "
                              f"{classes}")
    return names


def _check_same_ids(test_ids: list[str], sample: pd.DataFrame, data: DataConfig) -> None:
    sample_ids = sample[data.id_column].tolist()
    dupes = sorted(set(pd.Series(test_ids)[pd.Series(test_ids).duplicated()]))
    if dupes:
        raise SubmissionError(f"predictions have duplicated ids {summarize_offenders(dupes)}")
    predicted, wanted = set(test_ids), set(sample_ids)
    missing = [i for i in sample_ids if i not in predicted]
    extra = [i for i in test_ids if i not in wanted]
    if missing or extra:
        raise SubmissionError(
            f"the predicted ids differ from {sample_path(data)}: no prediction for "
            f"{summarize_offenders(missing) if missing else '-'}; not in the sample: "
            f"{summarize_offenders(extra) if extra else '-'}. Predict the competition's test set "
            f"again (make predict) or fix data.test_csv / data.sample_submission.")


def build_submission(data: DataConfig, test_ids: Sequence[str],
                     predictions: np.ndarray | Sequence) -> pd.DataFrame:
    """A submission frame with the sample submission's columns, id set and id order.

    `predictions` are rows in `test_ids` order: probabilities (N, C) in `data.classes` order, or
    labels (N,) as class indices (integers) or class names (strings). A label submission takes the
    argmax of probabilities (decode a fitted cut-off first and pass the labels); probabilities and
    positive_probability submissions need probabilities (the latter keeps the positive column).
    """
    test_ids = [str(i) for i in test_ids]
    predictions = np.asarray(predictions)
    if len(predictions) != len(test_ids):
        raise SubmissionError(f"{len(test_ids)} test ids but {len(predictions)} prediction rows")
    sample = read_sample(data)
    kind = submission_kind(data, sample)
    _check_same_ids(test_ids, sample, data)
    # Position of each sample id in the predictions: rows follow the sample's order.
    order = pd.Index(test_ids).get_indexer(sample[data.id_column])
    frame = pd.DataFrame({data.id_column: sample[data.id_column].to_numpy(dtype=object)})

    if kind == "label":
        frame[label_column_of(sample, data)] = _labels_as_classes(predictions, data.classes)[order]
        return frame[list(sample.columns)]
    if predictions.ndim != 2 or predictions.shape[1] != len(data.classes):
        raise SubmissionError(f"a {kind} submission needs (N, {len(data.classes)}) "
                              f"probabilities, got shape {predictions.shape}")
    probs = predictions.astype(np.float64)[order]
    if kind == "positive_probability":
        frame[prediction_column_of(sample, data)] = probs[:, positive_index(data)]
    else:
        index = class_index(data.classes)
        for column in probability_columns_of(sample, data):
            frame[column] = probs[:, index[column]]
    return frame[list(sample.columns)]


# --------------------------------------------------------------------------------------------
# Validating and writing


def _column_problem(frame: pd.DataFrame, sample: pd.DataFrame) -> str | None:
    got, want = [str(c) for c in frame.columns], list(sample.columns)
    if got == want:
        return None
    missing = [c for c in want if c not in got]
    extra = [c for c in got if c not in want]
    if missing or extra:
        return (f"columns {got} differ from the sample's {want}: missing {missing or '-'}, "
                f"unexpected {extra or '-'}")
    return f"columns are in the order {got}; the sample's order is {want}"


def _id_problems(ids: list[str], sample_ids: list[str]) -> list[str]:
    problems = []
    if len(ids) != len(sample_ids):
        problems.append(f"{len(ids)} rows; the sample submission has {len(sample_ids)}")
    dupes = sorted(set(pd.Series(ids)[pd.Series(ids).duplicated()]))
    if dupes:
        problems.append(f"duplicated ids: {summarize_offenders(dupes)}")
    wanted, present = set(sample_ids), set(ids)
    missing = [i for i in sample_ids if i not in present]
    extra = [i for i in ids if i not in wanted]
    if missing:
        problems.append(f"wrong id set: {len(missing)} id(s) of the sample are missing: "
                        f"{summarize_offenders(missing)}")
    if extra:
        problems.append(f"wrong id set: {len(extra)} id(s) are not in the sample: "
                        f"{summarize_offenders(extra)}")
    if not problems and ids != sample_ids:
        first = next(k for k, (a, b) in enumerate(zip(ids, sample_ids)) if a != b)
        problems.append(f"wrong order: row {first + 1} has id {ids[first]!r} where the sample has "
                        f"{sample_ids[first]!r}; sort the rows like the sample submission")
    return problems


def _missing_value_problem(frame: pd.DataFrame, id_column: str) -> str | None:
    values = frame.drop(columns=[id_column])
    empty = values.isna() | values.astype(str).apply(lambda col: col.str.strip() == "")
    if not empty.to_numpy().any():
        return None
    rows = empty.any(axis=1)
    ids = frame.loc[rows, id_column].astype(str).tolist()
    columns = [c for c in values.columns if empty[c].any()]
    return (f"missing values (NaN or empty) in column(s) {columns} for id(s) "
            f"{summarize_offenders(ids)}")


def _label_problem(frame: pd.DataFrame, column: str, classes: list[str]) -> str | None:
    values = frame[column].dropna().astype(str)
    unknown = sorted(set(values) - set(classes) - {""})
    if not unknown:
        return None
    return (f"labels outside the class list {classes} in column {column!r}: "
            f"{summarize_offenders(unknown)} ({int(values.isin(unknown).sum())} rows)")


def _probability_problems(frame: pd.DataFrame, columns: list[str], id_column: str) -> list[str]:
    problems = []
    for column in columns:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        text = frame[column].astype(str).str.strip()
        not_numbers = numbers.isna() & frame[column].notna() & (text != "")
        if not_numbers.any():
            problems.append(f"column {column!r} has non-numbers for id(s) "
                            f"{summarize_offenders(frame.loc[not_numbers, id_column].tolist())}")
        outside = (numbers < 0) | (numbers > 1)
        if outside.any():
            problems.append(f"column {column!r} has probabilities outside [0, 1] for id(s) "
                            f"{summarize_offenders(frame.loc[outside, id_column].tolist())}")
    return problems


def validate_submission(frame: pd.DataFrame, data: DataConfig) -> None:
    """Raise SubmissionError naming every way `frame` differs from the sample submission."""
    sample = read_sample(data)
    where = f"submission for {data.name} does not match {sample_path(data)}"
    column_problem = _column_problem(frame, sample)
    if column_problem:  # the checks below need the right columns
        raise SubmissionError(f"{where}:\n  {column_problem}")

    ids = frame[data.id_column].astype(str).tolist()
    problems = _id_problems(ids, sample[data.id_column].tolist())
    missing_values = _missing_value_problem(frame, data.id_column)
    if missing_values:
        problems.append(missing_values)
    kind = submission_kind(data, sample)
    if kind == "label":
        label_problem = _label_problem(frame, label_column_of(sample, data), data.classes)
        if label_problem:
            problems.append(label_problem)
    elif kind == "positive_probability":
        problems += _probability_problems(frame, [prediction_column_of(sample, data)],
                                          data.id_column)
    else:
        problems += _probability_problems(frame, probability_columns_of(sample, data),
                                          data.id_column)
    if problems:
        raise SubmissionError(f"{where}:\n  " + "\n  ".join(problems))


def write_submission(frame: pd.DataFrame, path: Path | str, data: DataConfig) -> Path:
    """Validate against the sample submission, then write atomically; return the path."""
    validate_submission(frame, data)
    path = Path(path)
    write_csv_atomic(frame, path)
    return path


# --------------------------------------------------------------------------------------------
# Scoring against held-out labels (the demo has them; real competitions do not)


def read_solution(data: DataConfig) -> pd.DataFrame | None:
    """`solution_csv` (id, label) as strings, or None when the competition has none."""
    if not data.solution_csv:
        return None
    path = data.root_path / data.solution_csv
    solution = read_table(path, [data.id_column, data.label_column], data.id_column)
    unknown = sorted(set(solution[data.label_column]) - set(data.classes))
    if unknown:
        raise SubmissionError(f"{path}: labels {summarize_offenders(unknown)} are not in the "
                              f"class list {data.classes}")
    return solution


def _submission_probs(frame: pd.DataFrame, data: DataConfig) -> np.ndarray:
    """(N, C) in `data.classes` order: one-hot for a label submission, the class columns of a
    probabilities one, (1 - p, p) for a positive_probability one (p in the positive's column)."""
    sample = read_sample(data)
    kind = submission_kind(data, sample)
    if kind == "label":
        labels = frame[label_column_of(frame, data)].astype(str)
        return one_hot(targets_of(labels, data.classes), len(data.classes))
    if kind == "positive_probability":
        positive = frame[prediction_column_of(sample, data)].to_numpy(dtype=np.float64)
        probs = np.empty((len(frame), 2), dtype=np.float64)
        probs[:, positive_index(data)] = positive
        probs[:, 1 - positive_index(data)] = 1.0 - positive
        return probs
    return frame[data.classes].to_numpy(dtype=np.float64)


def score_against_solution(data: DataConfig, frame: pd.DataFrame) -> float | None:
    """The competition metric of a submission against `data.solution_csv`; None without one.

    Label metrics (accuracy, F1s, QWK) score the labels (binary F1 the positive probability at
    0.5); log-loss (with Kaggle's clipping) and ROC-AUC score the probabilities.
    """
    solution = read_solution(data)
    if solution is None:
        return None
    truth = solution.set_index(data.id_column)[data.label_column]
    ids = frame[data.id_column].astype(str)
    unknown = ids[~ids.isin(truth.index)].tolist()
    if unknown:
        raise SubmissionError(f"{data.root_path / data.solution_csv}: no label for submission "
                              f"id(s) {summarize_offenders(unknown)}")
    targets = targets_of(truth.loc[ids], data.classes)
    return score(data.metric, targets, _submission_probs(frame, data), positive_index(data))
