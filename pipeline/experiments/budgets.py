"""train.time_budget's record: the epochs a budget became for an experiment (budget.json beside
its folds; this module is its one owner), applied wherever the experiment's config is loaded,
so every command (train, predict, runs, ensemble, refit) sees the epochs training used.

    config = with_budget(config, layout)        # train.epochs from the record, when it matches
    write_budget(exp, {"time_budget": 30, "epochs": 12, ...})   # pipeline/training/budget.py

A budget's epochs come from a timing probe, and timings vary: measured once and recorded, they
stay what the experiment's folds were trained for, so a run stays reproducible and resumable
(delete budget.json, with FORCE=1, to measure again).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.base.config import Config
from pipeline.base.utils import write_text_atomic
from pipeline.experiments.layout import Experiment, Layout


def read_budget(exp: Experiment) -> dict[str, Any] | None:
    try:
        record = json.loads(exp.budget.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "epochs" in record else None


def write_budget(exp: Experiment, record: dict[str, Any]) -> None:
    write_text_atomic(exp.budget, json.dumps(record, indent=1, sort_keys=True))


def with_budget(config: Config, layout: Layout) -> Config:
    """The config with train.epochs as its time budget's record says (unchanged without a
    budget, or before the budget was measured, or for a record of another budget)."""
    budget = config.train.time_budget
    if budget is None:
        return config
    record = read_budget(layout.experiment(config.run_name))
    if record is None or record.get("time_budget") != budget:
        return config
    train = config.train.model_copy(update={"epochs": int(record["epochs"])})
    return config.model_copy(update={"train": train})
