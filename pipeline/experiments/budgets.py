"""train.time_budget's record: the epochs a budget became for an experiment (budget.json beside
its folds; this module is its one owner), applied wherever the experiment's config is loaded,
so every command (train, predict, runs, ensemble, refit) sees the epochs training used.

    config = with_budget(config, layout)        # train.epochs from the record, when it matches
    write_budget(exp, {"time_budget": 30, "epochs": 12, ...})   # pipeline/training/budget.py
    sibling_record(config, layout, "cpu")       # another seed's measurement, to take again

A budget's epochs come from a timing probe, and timings vary: measured once and recorded, they
stay what the experiment's folds were trained for, so a run stays reproducible and resumable
(delete budget.json, with FORCE=1, to measure again).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.base.config import Config, training_settings
from pipeline.base.fingerprints import fingerprint
from pipeline.base.utils import write_text_atomic
from pipeline.experiments.layout import Experiment, Layout


def read_budget(exp: Experiment) -> dict[str, Any] | None:
    try:
        record = json.loads(exp.budget.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "epochs" in record else None


def recorded_budget(exp: Experiment) -> float | None:
    """The time budget (minutes a fold) the experiment's epochs were measured for, or None."""
    record = read_budget(exp)
    try:
        return None if record is None else float(record["time_budget"])
    except (KeyError, TypeError, ValueError):
        return None


def write_budget(exp: Experiment, record: dict[str, Any]) -> None:
    write_text_atomic(exp.budget, json.dumps(record, indent=1, sort_keys=True))


def budget_key(config: Config) -> str:
    """What an epoch's seconds depend on: every training setting but the epochs themselves
    (another image size or model is another measurement)."""
    settings = training_settings(config.to_dict())
    settings["train"] = {k: v for k, v in settings["train"].items() if k != "epochs"}
    return fingerprint(settings)


PACE_ONLY = ("workers", "device", "compile", "amp", "channels_last", "micro_batch")


def pace_key(config: Config, world: int) -> str:
    """What an epoch's seconds depend on, across experiments: the training settings but the
    epochs, the seed and the budget (SEEDS=' runs train alike, so one measurement serves them
    all), with the settings of speed that change no result, and the processes it ran on."""
    resolved = config.to_dict()
    settings = training_settings(resolved)
    settings["train"] = {k: v for k, v in settings["train"].items()
                         if k not in ("epochs", "seed", "time_budget")}
    speed = {k: resolved["train"].get(k) for k in PACE_ONLY}
    return fingerprint({"settings": settings, "speed": speed, "world": world,
                        "cache": resolved.get("cache", {}).get("enabled")})


def sibling_record(config: Config, layout: Layout, device: str,
                   world: int = 1) -> tuple[dict[str, Any], str] | None:
    """(the record, its experiment) of another experiment of the competition measured with the
    same pace key on the same device, or None: seeds of one experiment then take one
    measurement, and one budget gives them the same epochs (they are averaged as one member)."""
    key = pace_key(config, world)
    for name in layout.experiment_names():
        record = read_budget(layout.experiment(name))
        if (name != config.run_name and record is not None and record.get("pace") == key
                and record.get("device") == device and record.get("seconds_per_epoch")):
            return record, name
    return None


def matching_record(config: Config, layout: Layout) -> dict[str, Any] | None:
    """The record of this budget under these settings, or None."""
    record = read_budget(layout.experiment(config.run_name))
    if record is None or record.get("time_budget") != config.train.time_budget \
            or record.get("settings") != budget_key(config):
        return None
    return record


def with_epochs(config: Config, epochs: int) -> Config:
    return config.model_copy(update={"train": config.train.model_copy(update={"epochs": epochs})})


def with_budget(config: Config, layout: Layout) -> Config:
    """The config with train.epochs as its time budget's record says (unchanged without a
    budget, or before the budget was measured under these settings)."""
    if config.train.time_budget is None:
        return config
    record = matching_record(config, layout)
    return config if record is None else with_epochs(config, int(record["epochs"]))
