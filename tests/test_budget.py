"""train.time_budget (BUDGET=): a budget becomes the epochs a probe says fit, recorded once,
part of the folds' identity, and the same epochs for every later command."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from pipeline.__main__ import main as cli
from pipeline.experiments.budgets import sibling_record
from pipeline.experiments.layout import Layout
from pipeline.experiments.manifests import read_manifest
from pipeline.experiments.state import load_experiment
from pipeline.training.budget import BUDGET_SHARE
from tests.conftest import dry_make, make_competition

SMALL = ["augment.image_size=16", "train.batch_size=4", "train.workers=0", "train.lr=0.02",
         "train.early_stopping=0"]


def competition(tmp_path):
    labels = [c for c in ("cat", "dog", "fox") for _ in range(6)]
    data = str(make_competition(tmp_path / "comp", labels))
    overrides = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                 f"submissions_dir={tmp_path / 'subs'}", f"reports_dir={tmp_path / 'reports'}",
                 f"audit_dir={tmp_path / 'audit'}", "folds.n_splits=2", *SMALL]
    assert cli(["folds", "--data", data, *overrides]) == 0
    return data, overrides


def test_a_budget_becomes_recorded_epochs_that_every_later_command_sees(tmp_path, capsys):
    data, overrides = competition(tmp_path)
    budget = ["train.time_budget=0.03"]  # 1.8 s a fold
    assert cli(["train", "--data", data, "--model", "resnet20", *overrides, *budget]) == 0
    out = capsys.readouterr().out
    config = load_experiment(data, "resnet20", [*overrides, *budget])
    assert config.run_name != load_experiment(data, "resnet20", overrides).run_name
    exp = Layout.of(config).experiment(config.run_name)
    record = json.loads(exp.budget.read_text())
    epochs = record["epochs"]
    assert record["time_budget"] == 0.03 and record["device"] == "cpu"
    # (seconds_per_epoch is rounded to 0.0001 s in the record)
    fitting = 0.03 * 60 * BUDGET_SHARE / record["seconds_per_epoch"]
    assert epochs in {max(1, math.floor(fitting * (1 + d))) for d in (-0.05, 0, 0.05)}
    assert "train.time_budget 0.03 min a fold: an epoch takes about" in out
    assert f"so {epochs} epoch(s)" in out
    # the epochs are the folds' identity, and what they trained
    assert config.train.epochs == epochs
    for k in (0, 1):
        manifest = read_manifest(exp.fold(k).train_manifest)
        assert manifest.details["settings"]["train"]["epochs"] == epochs
        assert manifest.details["settings"]["train"]["time_budget"] == 0.03
        assert len(pd.read_csv(exp.fold(k).log)) == epochs
    # again: current, not measured again (a probe's timing varies: the record does not)
    before = exp.budget.read_text()
    assert cli(["train", "--data", data, "--model", "resnet20", *overrides, *budget]) == 0
    out = capsys.readouterr().out
    assert "an epoch takes about" not in out and "current" in out
    assert exp.budget.read_text() == before
    # another image size is another measurement: not the 16 px epochs
    other = load_experiment(data, "resnet20", [*overrides, *budget, "augment.image_size=24"],
                            name=config.run_name)
    unbudgeted = load_experiment(data, "resnet20", [*overrides, "augment.image_size=24"])
    assert other.train.epochs == unbudgeted.train.epochs  # the record is not applied
    # predict, ensemble and runs judge the experiment by the same epochs
    for verb in ("predict", "ensemble"):
        args = ["--models" if verb == "ensemble" else "--model", config.run_name]
        assert cli([verb, "--data", data, *args, *overrides]) == 0
    assert cli(["runs", "--data", data, *overrides]) == 0
    runs = capsys.readouterr().out
    assert "complete" in runs and "stale" not in runs and "0.03 min/fold" in runs


def test_seeds_under_one_budget_take_one_measurement_and_the_same_epochs(tmp_path, capsys):
    """SEEDS=0,1 with BUDGET=: the second seed takes the first one's measurement (a probe's
    timing varies; the seeds' epochs must not, or they are not averaged as one member)."""
    data, overrides = competition(tmp_path)
    assert cli(["train", "--data", data, "--model", "resnet20", "--seeds", "0,1", *overrides,
                "train.time_budget=0.02"]) == 0
    out = capsys.readouterr().out
    assert out.count("an epoch takes about") == 2 and out.count("as measured for") == 1
    records = [json.loads(p.read_text())
               for p in sorted((tmp_path / "runs" / "tiny").glob("*/budget.json"))]
    assert len(records) == 2 and records[0]["epochs"] == records[1]["epochs"]
    assert records[0]["pace"] == records[1]["pace"]
    assert records[0]["settings"] != records[1]["settings"]  # each seed's own record
    # another image size is another pace: nothing lent
    other = load_experiment(data, "resnet20", [*overrides, "train.time_budget=0.02",
                                               "augment.image_size=24"])
    assert sibling_record(other, Layout.of(other), "cpu") is None
    seed2 = load_experiment(data, "resnet20", [*overrides, "train.time_budget=0.5",
                                               "train.seed=2"])
    assert sibling_record(seed2, Layout.of(seed2), "cpu") is not None  # another budget: lent
    assert sibling_record(seed2, Layout.of(seed2), "cuda") is None


def test_epochs_and_a_budget_together_are_refused(tmp_path, capsys):
    data, overrides = competition(tmp_path)
    assert cli(["train", "--data", data, "--model", "resnet20", *overrides,
                "train.time_budget=1", "train.epochs=3"]) == 1
    assert "train.time_budget=1 chooses the epochs; train.epochs=3 is set too (EPOCHS=, ARGS=, " \
           "or the experiment's overrides): leave one of them out" in capsys.readouterr().err


@pytest.mark.parametrize("given, minutes", [("45", 45), ("45m", 45), ("2h", 120), ("1h30m", 90)])
def test_budget_takes_minutes_or_hours(tmp_path, given, minutes):
    data, overrides = competition(tmp_path)
    config = load_experiment(data, "resnet20", [*overrides, f"train.time_budget={given}"])
    assert config.train.time_budget == minutes
    assert f"train.time_budget={given}" in dry_make("train", f"BUDGET={given}").stdout
