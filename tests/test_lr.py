"""`make lr`: the learning-rate sweep on fold 0, its suggestion, and the command it prints."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pandas as pd
import pytest

from pipeline.__main__ import main as cli
from pipeline.base.utils import PipelineError
from pipeline.training.lr_finder import suggestion
from tests.conftest import REPO, experiment_dir
from tests.test_train import tiny


def test_the_suggestion_lies_where_the_loss_falls(tmp_path, capsys):
    labels = [c for c in ("cat", "dog", "fox") for _ in range(12)]
    config = tiny(tmp_path, labels=labels)
    where = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
             f"audit_dir={tmp_path / 'audit'}",
             "folds.n_splits=2", "augment.image_size=16", "train.batch_size=4", "train.workers=0"]
    data = str(tmp_path / "comp" / "tiny.yaml")
    assert cli(["lr", "--data", data, "--model", "resnet20", "--steps", "60", *where]) == 0
    out = capsys.readouterr().out
    folder = experiment_dir(config).with_name("resnet20-image_size16-batch_size4")
    sweep = pd.read_csv(folder / "lr_sweep.csv")
    assert (folder / "lr_sweep.png").stat().st_size > 10_000
    assert sorted(p.name for p in folder.iterdir()) == [  # no fold
        "lr_sweep.csv", "lr_sweep.manifest.json", "lr_sweep.png"]
    assert len(sweep) <= 60 and sweep["lr"].iloc[0] == pytest.approx(1e-7)
    assert np.all(np.diff(sweep["lr"]) > 0)  # exponential: each step's rate above the last
    suggested = float(re.search(r"suggested train.lr\s+(\S+)", out).group(1))
    at = int(np.abs(np.log(sweep["lr"] / suggested)).argmin())
    lowest = len(sweep) // 10 + int(sweep["smoothed"].iloc[len(sweep) // 10:].argmin())
    # where the loss falls: after the sweep's start and before its lowest point, below the start
    assert 0 < at < lowest
    assert sweep["smoothed"].iloc[at] < sweep["smoothed"].iloc[: len(sweep) // 10].mean()
    assert sweep["smoothed"].iloc[at + 1] < sweep["smoothed"].iloc[at - 1]
    # the same sweep again is current: not run, the same suggestion
    assert cli(["lr", "--data", data, "--model", "resnet20", "--steps", "60", *where]) == 0
    again = capsys.readouterr()
    assert "its sweep is current" in again.out + again.err and "learning-rate sweep" not in again.err
    assert f"suggested train.lr    {suggested:.2g}" in again.out
    # the printed command trains with it, as printed, on this competition
    command = re.search(r"to train with it: (make train .*)", out).group(1)
    assert f"train.lr={suggested:.2g}" in command and f"DATA={data}" in command
    done = subprocess.run(["bash", "-c", command.replace("make train", "make train FOLDS=0 "
                           "EPOCHS=1", 1)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    trained = folder.with_name(f"resnet20-image_size16-batch_size4-epochs1-lr{suggested:.2g}")
    assert (trained / "fold0" / "best.pt").is_file()


def test_a_sweep_whose_loss_never_falls_says_what_to_change():
    rising = pd.DataFrame({"lr": np.logspace(-7, 1, 50), "loss": np.linspace(2, 3, 50),
                           "smoothed": np.linspace(2, 3, 50)})
    with pytest.raises(PipelineError, match=r"did not fall.*make lr START=1e-8.*STEPS=300"):
        suggestion(rising)


def test_the_report_shows_the_sweep_of_a_trained_experiment(tmp_path):
    config = tiny(tmp_path, extra=["train.epochs=1"])
    where = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
             f"reports_dir={tmp_path / 'reports'}", f"audit_dir={tmp_path / 'audit'}",
             "folds.n_splits=2", "augment.image_size=16",
             "train.batch_size=4", "train.workers=0", "train.lr=0.02", "train.epochs=1"]
    data = str(tmp_path / "comp" / "tiny.yaml")
    for verb in (["train", "--folds", "0"], ["lr", "--steps", "30", "--start", "1e-4"],
                 ["report"]):
        assert cli([verb[0], "--data", data, *(["--model", "resnet20"] if verb[0] != "report"
                    else []), *verb[1:], *where]) == 0
    page = (tmp_path / "reports" / "tiny" / "experiments" / f"{experiment_dir(config).name}.html")
    assert 'id="lr-sweep"' in page.read_text()
