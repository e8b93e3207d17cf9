"""One owner of how a competition scores (pipeline/base/task.py): the class index, the positive
class, the metric of out-of-fold probabilities, and the stages that print those numbers."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from pipeline.base.config import load_config
from pipeline.base.task import Scorer, class_index, positive_index, targets_of
from tests.test_provenance import Competition

# The positive class listed first, and the minority, so its F1 differs from the other class's
LABELS = ["pos"] * 6 + ["neg"] * 12


def test_targets_follow_the_class_list_and_mark_strangers():
    assert class_index(["b", "a"]) == {"b": 0, "a": 1}
    assert targets_of(["a", "b", "zz"], ["b", "a"]).tolist() == [1, 0, -1]


def test_the_positive_class_is_the_named_one_or_the_second(tmp_path):
    comp = Competition(tmp_path, labels=LABELS, classes=["pos", "neg"], metric="binary_f1",
                       positive_class="pos")
    assert positive_index(comp.config().data) == 0
    other = Competition(tmp_path / "b", labels=LABELS, classes=["pos", "neg"], metric="binary_f1")
    assert positive_index(other.config().data) == 1
    assert positive_index(load_config("digits").data) == 1  # not binary: never used


def f1_of(frame: pd.DataFrame, positive: str) -> float:
    """The F1 of class `positive` at a 0.5 cut-off, straight from sklearn."""
    return f1_score(frame["label"] == positive, frame[positive] >= 0.5, zero_division=0)


def oof_files(comp: Competition, name: str, file: str) -> pd.DataFrame:
    return pd.concat([pd.read_csv(comp.run_dir(name) / f"fold{k}" / file, dtype=str,
                                  keep_default_na=False) for k in (0, 1)]).astype(
        {"pos": float, "neg": float})


def test_a_first_listed_positive_class_is_scored_as_positive_everywhere(tmp_path, capsys):
    comp = Competition(tmp_path, labels=LABELS, classes=["pos", "neg"], metric="binary_f1",
                       positive_class="pos")
    assert comp("folds") == 0
    assert comp("train", "--name", "first", "train.epochs=2") == 0
    capsys.readouterr()
    assert comp("predict", "--name", "first", "train.epochs=2", "tta.views=hflip") == 0
    out = capsys.readouterr().out
    plain, tta = oof_files(comp, "first", "oof.csv"), oof_files(comp, "first", "oof_tta.csv")
    right, wrong = f1_of(plain, "pos"), f1_of(plain, "neg")
    assert abs(right - wrong) > 1e-3  # the test can tell the two classes apart
    line = re.search(r"out-of-fold binary_f1 (\S+) without TTA, (\S+) with hflip", out)
    assert float(line.group(1)) == round(right, 4)
    assert float(line.group(2)) == round(f1_of(tta, "pos"), 4)

    assert comp("runs") == 0  # make runs: the leaderboard's OOF column
    board = pd.read_csv(comp.tmp / "runs" / "tiny" / "leaderboard.csv")
    assert abs(board.loc[board["experiment"] == "first", "oof"].item() - right) < 1e-9

    capsys.readouterr()  # make pseudo: the table at its end
    assert comp("pseudo", "--name", "first", "train.epochs=2", "pseudo.mode=soft",
                f"pseudo_dir={tmp_path / 'pseudo'}") == 0
    table = capsys.readouterr().out.splitlines()
    (row,) = [r for r in table if r.startswith("first ") and "without pseudo-labels" in r]
    assert float(row.split()[-1]) == round(right, 4)


def test_a_scorer_scores_a_probability_file_by_its_positive_class():
    frame = pd.DataFrame({"id": list("abcde"), "label": ["pos", "pos", "neg", "neg", "neg"],
                          "pos": [0.9, 0.8, 0.6, 0.7, 0.2]})
    frame["neg"] = 1 - frame["pos"]
    first = Scorer(("pos", "neg"), "binary_f1", False, positive=0)
    assert first.score_frame(frame) == f1_of(frame, "pos")
    second = Scorer(("pos", "neg"), "binary_f1", False, positive=1)
    assert second.score_frame(frame) == f1_of(frame, "neg")
    assert not np.isclose(first.score_frame(frame), second.score_frame(frame))
