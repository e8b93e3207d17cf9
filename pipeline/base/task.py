"""How a competition scores: class -> index, the positive class, the metric of OOF probabilities.

    scorer = Scorer.of(config.data)
    targets = scorer.targets(frame["label"])          # class indices (N,) in `classes` order
    scorer.score(targets, probs)                      # the competition metric of (N, C) probabilities
    scorer.score_frame(read_probs(part.oof))          # ... of a probability file (id, label, classes)

The one owner of these facts: a model's output k is `classes[k]`; a binary competition's
positive class (whose probability is submitted as `id,target` and whose F1 is `binary_f1`) is
`positive_class`, else the second of `classes`. Every stage that scores (training's epoch
choice, `make predict`'s TTA gain, `make runs`, `make pseudo`, the ensemble) asks a Scorer, so
a first-listed positive class is the positive class everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.base import metrics
from pipeline.base.config import DataConfig

UNKNOWN = -1  # the index of a label outside the class list (a folds file of an older list)


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """{class name: model output index}, the order of `classes`."""
    return {name: i for i, name in enumerate(classes)}


def targets_of(labels: Iterable[str], classes: Sequence[str]) -> np.ndarray:
    """Class indices (N,) int64 of labels spelled as in `classes`; UNKNOWN (-1) for any other."""
    index = class_index(classes)
    return np.fromiter((index.get(str(label), UNKNOWN) for label in labels), dtype=np.int64)


def positive_index(data: DataConfig) -> int:
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
    def of(cls, data: DataConfig) -> Scorer:
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
                                    self.positive)

    def report(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        """The competition metric first, then accuracy, macro-F1, log-loss (and QWK if ordinal)."""
        return metrics.report_metrics(self.metric, targets, probs, self.ordinal, self.positive)

    def probs_of(self, frame: pd.DataFrame) -> np.ndarray:
        """The class columns of a probability file, (N, C) in `classes` order."""
        return frame[list(self.classes)].to_numpy(np.float64)

    def score_frame(self, frame: pd.DataFrame) -> float:
        """The metric of a probability file that has a `label` column (an OOF file)."""
        return self.score(self.targets(frame["label"]), self.probs_of(frame))

    def is_better(self, new: float, best: float | None, metric: str | None = None) -> bool:
        return metrics.is_better(metric or self.metric, new, best)


def best_log_row(log: pd.DataFrame, metric: str) -> pd.Series:
    """The log row of a fold's best epoch: by the metric as the submission decodes it
    (`decoded`), else the metric, or the lowest validation loss where the metric is undefined on
    the fold (as training chose its best.pt)."""
    column = "decoded" if "decoded" in log and log["decoded"].notna().any() else metric
    if column in log and log[column].notna().any():
        values = log[column]
        return log.loc[values.idxmax() if metrics.higher_is_better(metric) else values.idxmin()]
    return log.loc[log["valid_loss"].idxmin()]


def best_epochs(logs: list[pd.DataFrame], metric: str) -> list[int]:
    """Each log's best epoch (1-based), as the folds chose their best.pt."""
    return [int(best_log_row(log, metric)["epoch"]) for log in logs if not log.empty]
