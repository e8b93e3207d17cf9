"""Probability files, the currency between stages: written by train and predict, read by the
ensemble, pseudo-labels, runs and the report.

One row per image id and one column per class, named by the class (`id[, label], <classes>`);
a regression head adds `grade`, the predicted grade, which the class columns encode as a
two-point distribution (engine.grade_to_probs), so every later stage reads them as
probabilities. Ids and labels are strings (`0001` stays `0001`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.layout import Part, PseudoSet
from pipeline.utils import PipelineError, summarize_offenders


class PredictionFileError(PipelineError):
    """A probability file is not what its stage wrote; the message names it and the remedy."""


def probability_frame(ids: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                      labels: Sequence[str] | None = None,
                      head: str = "classification") -> pd.DataFrame:
    """id[, label], one probability column per class and, for a regression head, `grade`."""
    frame = pd.DataFrame(probs, columns=list(classes))
    if head == "regression":
        frame["grade"] = probs @ np.arange(len(classes), dtype=np.float64)
    if labels is not None:
        frame.insert(0, "label", list(labels))
    frame.insert(0, "id", list(ids))
    return frame


def read_probs(path: Path) -> pd.DataFrame:
    """A probability file as written, ids and labels as strings (no checks)."""
    return pd.read_csv(path, dtype={"id": str, "label": str}, keep_default_na=False)


def read_probabilities(path: Path, classes: Sequence[str], with_label: bool = False) -> pd.DataFrame:
    """A probability CSV: `id` (+ `label`) as strings, one float column per class, checked."""
    frame = read_probs(path)
    meta = ["id"] + (["label"] if with_label else [])
    missing = [c for c in [*meta, *classes] if c not in frame.columns]
    if missing:
        raise PredictionFileError(f"{path}: missing column(s) {missing}; columns are "
                                  f"{list(frame.columns)}. The file was made for other classes "
                                  f"than {list(classes)}: re-run `make predict` for this model.")
    dupes = sorted(set(frame["id"][frame["id"].duplicated()]))
    if dupes:
        raise PredictionFileError(f"{path}: duplicated ids {summarize_offenders(dupes)}")
    probs = frame[list(classes)].apply(pd.to_numeric, errors="coerce")
    bad = probs.isna().any(axis=1)
    if bad.any():
        raise PredictionFileError(f"{path}: missing or non-numeric probabilities for id(s) "
                                  f"{summarize_offenders(frame.loc[bad, 'id'].tolist())}; re-run "
                                  f"`make predict` for this model")
    return pd.concat([frame[meta], probs], axis=1)


def oof_file(part: Part) -> Path:
    """The OOF file the ensemble reads: with TTA (oof_tta.csv) where predicted, else oof.csv."""
    for path in (part.oof_tta, part.oof):
        if path.is_file():
            return path
    raise PredictionFileError(f"{part.dir} has no {part.oof_tta.name} or {part.oof.name}; re-run "
                              f"`make predict` (or train) for this model")


def read_fold_oof(part: Part, fold: int, folds: pd.DataFrame,
                  classes: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """(one fold's OOF rows, the file's stem), after checking the file holds exactly that fold's
    ids with the labels of the fold file."""
    path = oof_file(part)
    oof = read_probabilities(path, classes, with_label=True)
    expected = folds.loc[folds["fold"] == fold, ["id", "label"]]
    wrong = sorted(set(oof["id"]) ^ set(expected["id"]))
    if wrong:
        raise PredictionFileError(f"{path}: its ids are not fold {fold} of {len(expected)} ids in "
                                  f"the fold file ({summarize_offenders(wrong)} differ): it was "
                                  f"re-split after this model was trained; retrain it (FORCE=1)")
    truth = expected.set_index("id")["label"].reindex(oof["id"]).to_numpy()
    relabelled = oof.loc[oof["label"].to_numpy() != truth, "id"].tolist()
    if relabelled:
        raise PredictionFileError(f"{path}: labels differ from the fold file for id(s) "
                                  f"{summarize_offenders(relabelled)}; retrain on the current data")
    return oof, path.stem


def aligned_test(path: Path, classes: Sequence[str],
                 ids: list[str] | None) -> tuple[list[str], np.ndarray]:
    """Test probabilities (N, C), rows put in `ids` order (the file's own when None)."""
    frame = read_probabilities(path, classes)
    if ids is None:
        return frame["id"].tolist(), frame[list(classes)].to_numpy(np.float64)
    differ = sorted(set(frame["id"]) ^ set(ids))
    if differ:
        raise PredictionFileError(f"{path}: its test ids differ from the other folds' "
                                  f"({summarize_offenders(differ)}); re-run `make predict` for "
                                  f"this model")
    return ids, frame.set_index("id").loc[ids, list(classes)].to_numpy(np.float64)


def read_pseudo(pseudo: PseudoSet, part: str,
                classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(test ids, target distributions (N, C)) of one part (fold<k> or full) of a pseudo-label
    set, as `make pseudo` wrote it."""
    path = pseudo.part(part)
    if not path.is_file():
        raise PredictionFileError(f"{path} not found: train.pseudo={pseudo.name} names no "
                                  f"complete pseudo-label set; run `make pseudo MODEL=...`")
    frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    return frame["id"].tolist(), frame[list(classes)].to_numpy(np.float32)
