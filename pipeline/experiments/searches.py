"""Which folds chose an experiment's settings: `make tune`'s record (search.json beside its
folds; this module is its one owner), read by every figure that calls itself a CV.

    write_search(exp, {"folds": [0], "trials": 20, "study": "runs/digits/tune/resnet18"})
    searched_folds(exp)        # [0]: fold 0's score is the best of 20, not a CV

A search scores its trials on fold 0 and keeps the best: that fold's score is the maximum of
many noisy estimates, optimistic by the choice. The experiment's other folds were never scored
by any trial, so their CV is honest; `make runs`, `make train`'s summary and the ensemble leave
the searched folds out of the CV they print, and say so.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.base.utils import write_text_atomic
from pipeline.experiments.layout import Experiment


def write_search(exp: Experiment, record: dict[str, Any]) -> None:
    write_text_atomic(exp.search, json.dumps(record, indent=1, sort_keys=True))


def read_search(exp: Experiment) -> dict[str, Any] | None:
    try:
        record = json.loads(exp.search.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def searched_folds(exp: Experiment) -> list[int]:
    """The folds whose scores chose the experiment's settings (none: it was not tuned)."""
    record = read_search(exp) or {}
    try:
        return sorted(int(k) for k in record.get("folds", []))
    except (TypeError, ValueError):
        return []


def searched_note(exp: Experiment) -> str:
    """How the tables say it: '' for an experiment no search chose."""
    folds = searched_folds(exp)
    if not folds:
        return ""
    trials = (read_search(exp) or {}).get("trials", "several")
    return (f"fold(s) {folds} chose its settings (make tune, best of {trials} trials): "
            f"left out of its CV")
