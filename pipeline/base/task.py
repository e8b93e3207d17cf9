"""The task: how a competition scores, what the model outputs, how a fold's best epoch is chosen.

    task = Task.of(config.data, config.model, config.train)   # resolved once, frozen
    task.head, task.epoch_rule                        # Head.REGRESSION, EpochRule.LOSS
    scorer = Scorer.of(config.data)                   # the scoring part alone (a Task is one)
    targets = scorer.targets(frame["label"])          # class indices (N,) in `classes` order
    scorer.score(targets, probs)                      # the competition metric of (N, C) probabilities
    scorer.score_frame(read_probs(part.oof))          # ... of a probability file (id, label, classes)

The one owner of these facts: a model's output k is `classes[k]`; a binary competition's
positive class (whose probability is submitted as `id,target` and whose F1 is `binary_f1`) is
`positive_class`, else the second of `classes`. Every stage that scores (training's epoch
choice, `make predict`'s TTA gain, `make runs`, `make pseudo`, the ensemble) asks a Scorer, so
a first-listed positive class is the positive class everywhere.

Training reads only the task: never `ensemble.decode` nor the sample submission's header, which
the ensemble reads to decode the submission's labels. Every part of the task that changes what
training produces is a training setting (config.training_settings: the classes, metric, ordinal,
positive class, model.head, train.epoch_rule), so a change reports trained folds stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np
import pandas as pd

from pipeline.base import metrics


# What the task reads of the config's sections (base/config.py builds the task, Config.task, so
# this module names the fields it needs instead of importing the config back).
class DataFields(Protocol):
    classes: list[str]
    metric: str
    ordinal: bool
    positive_class: str | None


class ModelFields(Protocol):
    head: str


class TrainFields(Protocol):
    epoch_rule: str


UNKNOWN = -1  # the index of a label outside the class list (a folds file of an older list)


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """{class name: model output index}, the order of `classes`."""
    return {name: i for i, name in enumerate(classes)}


def targets_of(labels: Iterable[str], classes: Sequence[str]) -> np.ndarray:
    """Class indices (N,) int64 of labels spelled as in `classes`; UNKNOWN (-1) for any other."""
    index = class_index(classes)
    return np.fromiter((index.get(str(label), UNKNOWN) for label in labels), dtype=np.int64)


def positive_index(data: DataFields) -> int:
    """Binary competitions: the output index of the positive class (`positive_class`, else the
    second of `classes`). Other competitions have none; 1 is returned and never used."""
    return data.classes.index(data.positive_class) if data.positive_class else 1


@dataclass(frozen=True)
class Scorer:
    """The competition metric bound to its classes and positive class."""

    classes: tuple[str, ...]
    metric: str
    ordinal: bool
    positive: int

    @classmethod
    def of(cls, data: DataFields) -> Scorer:
        return cls(tuple(data.classes), data.metric, data.ordinal, positive_index(data))

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def targets(self, labels: Iterable[str]) -> np.ndarray:
        return targets_of(labels, self.classes)

    def score(self, targets: np.ndarray, probs: np.ndarray, metric: str | None = None) -> float:
        """`metric` (default: the competition's) of probabilities (N, C) against targets (N,)."""
        return metrics.score(metric or self.metric, targets, probs, self.positive)

    def score_labels(self, targets: np.ndarray, labels: np.ndarray,
                     metric: str | None = None) -> float:
        """The metric of hard labels (N,), e.g. after thresholds or a cut-off."""
        return metrics.score_labels(metric or self.metric, targets, labels, self.n_classes,
                                    positive=self.positive)

    def report(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        """The competition metric first, then accuracy, macro-F1, log-loss (and QWK if ordinal)."""
        return metrics.report_metrics(self.metric, targets, probs, self.ordinal, positive=self.positive)

    def probs_of(self, frame: pd.DataFrame) -> np.ndarray:
        """The class columns of a probability file, (N, C) in `classes` order."""
        return frame[list(self.classes)].to_numpy(np.float64)

    def score_frame(self, frame: pd.DataFrame) -> float:
        """The metric of a probability file that has a `label` column (an OOF file)."""
        return self.score(self.targets(frame["label"]), self.probs_of(frame))

    def is_better(self, new: float, best: float | None, metric: str | None = None) -> bool:
        return metrics.is_better(metric or self.metric, new, best)


class Head(str, Enum):
    """What the model outputs (model.head)."""

    CLASSIFICATION = "classification"  # one logit per class
    REGRESSION = "regression"  # one output, the grade (ordinal competitions)
    BOTH = "both"  # the class logits and the grade on one body

    @property
    def has_grade(self) -> bool:
        return self is not Head.CLASSIFICATION


class EpochRule(str, Enum):
    """How a fold's best epoch is chosen (train.epoch_rule). None fits anything on the rows it
    scores: a decoder fitted on the validation fold and scored on it picks undertrained epochs
    (issue 25: in-sample thresholds reach QWK 1.0 by epoch 3 of 8 on a tiny ordinal competition
    whose argmax QWK there is 0.63). Chosen on the benchmark suite: bench/epoch_rule.py."""

    METRIC = "metric"  # the metric of a fixed decoding: argmax; a grade rounded (cuts 0.5, 1.5..)
    LOSS = "loss"  # the lowest validation loss
    # the metric after the submission's decoder (thresholds / cut-off), cross-fitted within the
    # validation fold: fitted on one half, scored on the other, and the other way round
    CROSS_FIT = "cross_fit"


class Decoder(str, Enum):
    """How probabilities become a label submission's labels (pipeline/ensembling/decode.py)."""

    ARGMAX = "argmax"
    THRESHOLDS = "thresholds"  # cuts of the expected grade (ordinal, QWK)
    CUTOFF = "cutoff"  # a cut-off on the positive class's probability (binary, F1)


CUTOFF_DECODED_METRICS = ("binary_f1", "weighted_f1", "macro_f1")


@dataclass(frozen=True)
class Task(Scorer):
    """The competition's scoring (Scorer) with what training needs besides: the model's head and
    the rule that chooses a fold's best epoch. Every field is a training setting."""

    head: Head = Head.CLASSIFICATION
    epoch_rule: EpochRule = EpochRule.LOSS

    @classmethod
    def of(cls, data: DataFields, model: ModelFields | None = None,  # type: ignore[override]
           train: TrainFields | None = None) -> Task:
        scorer = Scorer.of(data)
        return cls(scorer.classes, scorer.metric, scorer.ordinal, scorer.positive,
                   Head(model.head) if model else Head.CLASSIFICATION,
                   EpochRule(train.epoch_rule) if train else EpochRule.LOSS)

    @property
    def label_decoder(self) -> Decoder:
        """The decoder fitted for this competition's labels (ensemble.decode=auto with a label
        submission; cross-fitted by EpochRule.CROSS_FIT): thresholds for ordinal QWK, a cut-off
        for a binary competition scored by an F1, else argmax."""
        if self.ordinal and self.metric == "qwk":
            return Decoder.THRESHOLDS
        if self.n_classes == 2 and self.metric in CUTOFF_DECODED_METRICS:
            return Decoder.CUTOFF
        return Decoder.ARGMAX

    @property
    def higher_is_better(self) -> bool:
        return metrics.higher_is_better(self.metric)


def best_log_row(log: pd.DataFrame, metric: str) -> pd.Series:
    """The log row of a fold's best epoch, as training chose its best.pt: the last epoch marked
    `best` (the loop marks each epoch that improved under train.epoch_rule). Logs written before
    that column: by `decoded` (the in-sample decoded metric), else the metric, or the lowest
    validation loss where the metric is undefined on the fold."""
    if "best" in log and log["best"].astype(bool).any():
        return log[log["best"].astype(bool)].iloc[-1]
    column = "decoded" if "decoded" in log and log["decoded"].notna().any() else metric
    if column in log and log[column].notna().any():
        values = log[column]
        return log.loc[values.idxmax() if metrics.higher_is_better(metric) else values.idxmin()]
    return log.loc[log["valid_loss"].idxmin()]


def best_epochs(logs: list[pd.DataFrame], metric: str) -> list[int]:
    """Each log's best epoch (1-based), as the folds chose their best.pt."""
    return [int(best_log_row(log, metric)["epoch"]) for log in logs if not log.empty]
