"""Probability files, the currency between stages: written by train and predict, read by the
ensemble, pseudo-labels, runs and the report.

One row per image id and one column per class, named by the class (`id[, label], <classes>`);
a grade output adds `grade`: a regression head's grade, which its class columns encode as a
two-point distribution (engine.grade_to_probs), so every later stage reads them as
probabilities; a `both` head's grade output beside its class probabilities, for the ensemble to
choose from (combine.choose_views). Ids and labels are strings (`0001` stays `0001`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.base.utils import PipelineError, make_command, summarize_offenders
from pipeline.experiments.layout import Part, PseudoSet

GRADE = "grade"  # the column of a grade output


class PredictionFileError(PipelineError):
    """A probability file is not what its stage wrote; the message names it and the remedy."""


def predict_again(path: Path) -> str:
    """`make predict MODEL=<experiment> DATA=...` for a probability file of a trained part,
    runs/<competition>/<experiment>/<fold<k> or full>/<file>: the remedy as it runs."""
    experiment = path.parent.parent
    return f"`{make_command('predict', experiment.parent.name, MODEL=experiment.name)}`"


def probability_frame(ids: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                      labels: Sequence[str] | None = None,
                      *, grade: np.ndarray | None = None) -> pd.DataFrame:
    """id[, label], one probability column per class and, from a grade output (a regression or
    `both` head), `grade`."""
    frame = pd.DataFrame(probs, columns=list(classes))
    if grade is not None:
        frame[GRADE] = grade
    if labels is not None:
        frame.insert(0, "label", list(labels))
    frame.insert(0, "id", list(ids))
    return frame


def read_probs(path: Path) -> pd.DataFrame:
    """A probability file as written, ids and labels as strings (no checks)."""
    return pd.read_csv(path, dtype={"id": str, "label": str}, keep_default_na=False)


def read_probabilities(path: Path, classes: Sequence[str], with_label: bool = False,
                       with_grade: bool = False) -> pd.DataFrame:
    """A probability CSV: `id` (+ `label`) as strings, one float column per class (+ `grade`),
    checked."""
    frame = read_probs(path)
    meta = ["id"] + (["label"] if with_label else [])
    if with_grade and GRADE not in frame.columns:
        raise PredictionFileError(f"{path}: no {GRADE} column, though its model has a grade "
                                  f"output: re-run {predict_again(path)}")
    classes = [*classes, GRADE] if with_grade else list(classes)
    missing = [c for c in [*meta, *classes] if c not in frame.columns]
    if missing:
        raise PredictionFileError(f"{path}: missing column(s) {missing}; columns are "
                                  f"{list(frame.columns)}. The file was made for other classes "
                                  f"than {list(classes)}: re-run {predict_again(path)}")
    dupes = sorted(set(frame["id"][frame["id"].duplicated()]))
    if dupes:
        raise PredictionFileError(f"{path}: duplicated ids {summarize_offenders(dupes)}")
    probs = frame[list(classes)].apply(pd.to_numeric, errors="coerce")
    bad = probs.isna().any(axis=1)
    if bad.any():
        raise PredictionFileError(f"{path}: missing or non-numeric probabilities for id(s) "
                                  f"{summarize_offenders(frame.loc[bad, 'id'].tolist())}; re-run "
                                  f"{predict_again(path)}")
    return pd.concat([frame[meta], probs], axis=1)


def oof_file(part: Part) -> Path:
    """The OOF file the ensemble reads: with TTA (oof_tta.csv) where predicted, else oof.csv."""
    for path in (part.oof_tta, part.oof):
        if path.is_file():
            return path
    raise PredictionFileError(f"{part.dir} has no {part.oof_tta.name} or {part.oof.name}; re-run "
                              f"{predict_again(part.oof)} (or train)")


def read_fold_oof(part: Part, fold: int, folds: pd.DataFrame, classes: Sequence[str],
                  *, with_grade: bool = False) -> tuple[pd.DataFrame, str]:
    """(one fold's OOF rows, the file's stem), after checking the file holds exactly that fold's
    ids with the labels of the fold file."""
    path = oof_file(part)
    oof = read_probabilities(path, classes, with_label=True, with_grade=with_grade)
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


def aligned_test(path: Path, classes: Sequence[str], ids: list[str] | None,
                 columns: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Test probabilities (N, C), rows put in `ids` order (the file's own when None); `columns`:
    other columns than the classes (["grade"])."""
    columns = list(columns or classes)
    frame = read_probabilities(path, classes, with_grade=GRADE in columns)
    if ids is None:
        return frame["id"].tolist(), frame[columns].to_numpy(np.float64)
    differ = sorted(set(frame["id"]) ^ set(ids))
    if differ:
        raise PredictionFileError(f"{path}: its test ids differ from the other folds' "
                                  f"({summarize_offenders(differ)}); re-run "
                                  f"{predict_again(path)}")
    return ids, frame.set_index("id").loc[ids, columns].to_numpy(np.float64)


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
