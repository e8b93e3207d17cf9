"""`make tune`: a tiny Optuna search on the CPU: stopped and resumed with the same study, a
pruned trial, and the best trial's optimistic score printed with its honest CV beside it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.base.config import load_config
from pipeline.experiments.layout import Layout
from pipeline.experiments.searches import searched_folds
from pipeline.experiments.state import load_experiment
from pipeline.training import loop
from pipeline.training.tuning import STUDY_FILE, base_digest
from tests.conftest import REPO, dry_make, write_image

# every trial: 3 epochs of resnet20 at 16 px on 2 folds of 60 images
SMALL = ["augment.image_size=16", "train.batch_size=8", "train.workers=0", "train.epochs=3",
         "model.name=resnet20", "folds.n_splits=3"]


def learnable_competition(tmp_path) -> tuple[str, list[str]]:
    """Three classes told apart by brightness (dark, grey, light, with noise), scored by log
    loss: a continuous metric, so that a trial that does not learn is behind at once."""
    root = tmp_path / "comp"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        label = ("dark", "grey", "light")[i % 3]
        level = {"dark": 40, "grey": 128, "light": 215}[label]
        image = np.clip(rng.normal(level, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
        path = root / "train" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        import cv2
        cv2.imwrite(str(path), image)
        rows.append({"id": f"{i:03d}", "label": label})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    test_ids = [f"t{i}" for i in range(3)]
    for i, image_id in enumerate(test_ids):
        write_image(root / "test" / image_id, seed=i)
    pd.DataFrame({"id": test_ids}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": test_ids, "dark": 0.3, "grey": 0.3, "light": 0.4}).to_csv(
        root / "sample_submission.csv", index=False)
    (root / "comp.yaml").write_text(yaml.safe_dump({
        "name": "comp", "root": str(root), "classes": ["dark", "grey", "light"],
        "metric": "log_loss"}))
    overrides = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                 f"audit_dir={tmp_path / 'audit'}", *SMALL]
    assert cli(["folds", "--data", str(root / "comp.yaml"), *overrides]) == 0
    return str(root / "comp.yaml"), overrides


def journal(layout: Layout):
    folder = layout.tune_dir("resnet20")
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(folder / STUDY_FILE)))


def study_name(data: str, overrides: list[str]) -> str:
    """The study of resnet20 under these settings, as `make tune` names it."""
    return f"comp/resnet20-{base_digest(load_experiment(data, 'resnet20', overrides))}"


def study_of(layout: Layout, name: str):
    return optuna.load_study(study_name=name, storage=journal(layout))


def write_space(monkeypatch, tmp_path, space: dict) -> None:
    """configs/resnet20.tune.yaml, in a copy of configs/ the test runs from."""
    import shutil

    from tests.conftest import REPO
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "configs" / "resnet20.tune.yaml").write_text(yaml.safe_dump(space))
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow  # search trials (the developers' guide: under the slow marker)
def test_a_stopped_tune_resumes_its_study_and_the_stopped_trial(tmp_path, monkeypatch, capsys):
    data, overrides = learnable_competition(tmp_path)
    write_space(monkeypatch, tmp_path, {"train.lr": {"low": 0.005, "high": 0.05, "log": True}})
    real, fits = loop.Trainer.fit, []

    def stopped_in_the_third_trial(self):
        fits.append(self.spec.part.dir)
        if len(fits) == 3:
            raise KeyboardInterrupt  # Ctrl-C
        return real(self)

    monkeypatch.setattr(loop.Trainer, "fit", stopped_in_the_third_trial)
    assert cli(["tune", "--data", data, "--model", "resnet20", "--trials", "4", *overrides]) == 130
    layout, name = Layout.of(load_config(data, None, overrides)), study_name(data, overrides)
    study = study_of(layout, name)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    stopped = study.trials[2]
    monkeypatch.setattr(loop.Trainer, "fit", real)
    capsys.readouterr()
    assert cli(["tune", "--data", data, "--model", "resnet20", "--trials", "4", "--name",
                "resnet20-best", *overrides]) == 0
    out = capsys.readouterr().out
    assert "2 of 4 trials done, 1 killed one(s) tried again" in out
    # NAME=: the best trial's fold 0 taken over (the same files), its other folds trained there
    trial = layout.experiment(study_of(layout, name).best_trial.user_attrs["experiment"])
    named = layout.experiment("resnet20-best")
    assert named.fold(0).log.read_bytes() == trial.fold(0).log.read_bytes()
    assert all(named.fold(k).oof.is_file() and not trial.fold(k).dir.exists() for k in (1, 2))
    assert searched_folds(named) == searched_folds(trial) == [0]
    config = load_config(data, None, overrides)
    from pipeline.experiments.leaderboard import leaderboard
    row = leaderboard(config.data, config.folds, layout).set_index("experiment").loc[named.name]
    assert row["status"].startswith("complete, fold(s) [0, 1, 2] to predict; fold(s) [0] chose "
                                    "its settings (make tune"), row["status"]
    study = study_of(layout, name)
    assert len(study.trials) == 5
    assert study.trials[3].params == stopped.params  # the stopped trial, first
    assert study.trials[3].user_attrs["experiment"] == stopped.user_attrs["experiment"]
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 4
    table = pd.read_csv(layout.tune_dir("resnet20") / "trials.csv")
    assert len(table) == 5 and "train.lr" in table.columns
    importance = pd.read_csv(layout.tune_importance("resnet20"))
    assert importance["setting"].tolist() == ["train.lr"]


@pytest.mark.slow
def test_a_trial_behind_the_median_is_pruned_and_the_best_is_honestly_scored(tmp_path,
                                                                                monkeypatch,
                                                                                capsys):
    data, overrides = learnable_competition(tmp_path)
    write_space(monkeypatch, tmp_path, {"train.lr": [0.01, 0.02, 1.0e-7]})
    layout, name = Layout.of(load_config(data, None, overrides)), study_name(data, overrides)
    # the first two trials learn; the third cannot (lr 1e-7): behind the median at epoch 2,
    # the first after the learning rate's warm-up
    study = optuna.create_study(study_name=name, storage=journal(layout), direction="minimize")
    for lr in (0.01, 0.02, 1.0e-7):
        study.enqueue_trial({"train.lr": lr})
    capsys.readouterr()
    assert cli(["tune", "--data", data, "--model", "resnet20", "--trials", "3", *overrides]) == 0
    out = capsys.readouterr().out
    study = study_of(layout, name)
    states = [t.state.name for t in study.trials]
    assert states[:2] == ["COMPLETE", "COMPLETE"] and states[2] == "PRUNED"
    pruned = layout.experiment(study.trials[2].user_attrs["experiment"]).fold(0)
    assert len(pd.read_csv(pruned.log)) < 3  # stopped before its last epoch
    # the best trial trained its other folds; their CV is the honest figure
    best = study.best_trial.user_attrs["experiment"]
    exp = layout.experiment(best)
    others = [pd.read_csv(exp.fold(k).oof) for k in (1, 2)]
    from pipeline.base.task import Scorer
    scorer = Scorer.of(load_config(data, None, overrides).data)
    honest = np.mean([scorer.score_frame(frame) for frame in others])
    assert f"fold 0 log_loss {study.best_value:.4f} (the search's: the best of 2 on the fold " \
           f"that chose it, optimistic)" in out
    assert f"folds 1,2 log_loss {honest:.4f} ± " in out and "(honest: folds no trial scored)" in out
    assert f"make predict ensemble MODEL={best}" in out
    # the next step, as printed (the test's folders added)
    where = [*overrides, f"submissions_dir={tmp_path / 'subs'}"]
    assert cli(["predict", "--data", data, "--model", best, *where]) == 0
    assert cli(["ensemble", "--data", data, "--models", best, *where]) == 0
    assert list((tmp_path / "subs" / "comp").glob(f"{best}_cv*.csv"))
    # the report shows the search: its trials and the setting's importance
    from pipeline.stages.report import build_report
    config = load_config(data, None, [*overrides, f"reports_dir={tmp_path / 'reports'}"])
    html = build_report(config).read_text()
    assert "Searches (make tune)" in html and "resnet20-tune-" in html and "pruned" in html
    # NAME=: the best settings under the user's name, taking over what the trial trained
    assert searched_folds(exp) == [0]

    def trained_again(self):
        raise AssertionError(f"{self.spec.part.dir} trained again")

    monkeypatch.setattr(loop.Trainer, "fit", trained_again)
    capsys.readouterr()
    assert cli(["tune", "--data", data, "--model", "resnet20", "--trials", "3", "--name",
                "resnet20-tuned", *overrides]) == 0
    out = capsys.readouterr().out
    assert f"folds 1,2 log_loss {honest:.4f} ± " in out
    assert "make predict ensemble MODEL=resnet20-tuned" in out
    assert searched_folds(layout.experiment("resnet20-tuned")) == [0]
    assert cli(["predict", "--data", data, "--model", "resnet20-tuned", *where]) == 0
    # a name of other settings (the pruned trial's) is refused before a file is touched
    other = study.trials[2].user_attrs["experiment"]
    before = sorted(p.name for p in layout.experiment(other).dir.rglob("*"))
    assert cli(["tune", "--data", data, "--model", "resnet20", "--trials", "3", "--name", other,
                *overrides]) == 1
    err = capsys.readouterr().err
    assert f"NAME={other}: it is an experiment of other settings" in err
    assert sorted(p.name for p in layout.experiment(other).dir.rglob("*")) == before
    # its remedy, run as printed by make itself: the best under the name it offers
    [remedy] = re.findall(r"`(make tune [^`]+)`", err)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run([*shlex.split(remedy), f"PYTHON={sys.executable}"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert searched_folds(layout.experiment(f"{other}-2")) == [0]
    assert f"folds 1,2 log_loss {honest:.4f} ± " in done.stdout + done.stderr
    # the best trial's fold 0 no longer current (here: its manifest lost): refused, and the
    # printed remedy, run as printed, retrains it; the tune then goes on
    exp.fold(0).train_manifest.unlink()
    capsys.readouterr()
    assert cli(["tune", "--data", data, "--model", "resnet20", "--trials", "3", *overrides]) == 1
    err = capsys.readouterr().err
    assert "the best trial's fold 0" in err and "is not current" in err, err
    [remedy] = re.findall(r"`(make train [^`]+)`", err)
    done = subprocess.run([*shlex.split(remedy), f"PYTHON={sys.executable}"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert exp.fold(0).train_manifest.is_file()
    monkeypatch.setattr(loop.Trainer, "fit", trained_again)  # nothing left to train
    assert cli(["tune", "--data", data, "--model", "resnet20", "--trials", "3", *overrides]) == 0


def test_make_tune_passes_trials_and_the_storage():
    out = dry_make("tune", "MODEL=resnet18", "TRIALS=8", "TUNE_STORAGE=sqlite:///t.db",
                   "NAME=best").stdout
    assert "TUNE_STORAGE='sqlite:///t.db'" in out and "pipeline tune --data digits --model " \
           "resnet18 --name best --trials 8" in out


def test_a_fold_that_chose_the_settings_is_left_out_of_every_cv(tmp_path, capsys):
    """make tune records fold 0 as the search's (search.json): `make runs`, the summary and the
    ensemble then print the CV of the other folds, and say why (a record written here as
    promote writes it: the search itself is a slow test)."""
    from pipeline.base.task import Scorer
    from pipeline.experiments.leaderboard import leaderboard, read_submissions
    from pipeline.experiments.searches import write_search
    from pipeline.experiments.state import joined_oof

    data, overrides = learnable_competition(tmp_path)
    where = [*overrides, "tta.views=none", f"submissions_dir={tmp_path / 'subs'}"]
    assert cli(["train", "--data", data, "--model", "resnet20", "--name", "m", *where]) == 0
    assert cli(["predict", "--data", data, "--model", "m", *where]) == 0
    config = load_config(data, None, where)
    layout, scorer = Layout.of(config), Scorer.of(config.data)
    exp = layout.experiment("m")
    every_fold = leaderboard(config.data, config.folds, layout).iloc[0]
    assert cli(["ensemble", "--data", data, "--models", "m", *where]) == 0
    [before] = read_submissions(config.data, config.folds, layout)
    assert before.cv == pytest.approx(every_fold["oof"])

    write_search(exp, {"folds": [0], "trials": 7})
    row = leaderboard(config.data, config.folds, layout).iloc[0]
    honest = [scorer.score_frame(pd.read_csv(exp.fold(k).oof)) for k in (1, 2)]
    assert row["cv mean"] == pytest.approx(np.mean(honest))
    assert row["oof"] == pytest.approx(scorer.score_frame(joined_oof(exp, [1, 2])))
    assert row["oof"] != pytest.approx(every_fold["oof"])
    assert "fold(s) [0] chose its settings (make tune, best of 7 trials)" in row["status"]
    capsys.readouterr()
    assert cli(["train", "--data", data, "--model", "m", *where]) == 0  # all current
    summary = exp.summary_md.read_text()
    assert "| 0 (search) |" in summary and "over 2 of 3 fold(s)" in summary
    assert cli(["ensemble", "--data", data, "--models", "m", *where]) == 0
    out = capsys.readouterr().out
    assert "fold(s) [0] chose the settings of m (make tune): the CV and its in-sample figure " \
           f"leave out their 20 rows (log_loss with them {before.cv:.4f}, optimistic;" in out
    [after] = [s for s in read_submissions(config.data, config.folds, layout)
               if s.name != before.name]
    [earlier] = [s for s in read_submissions(config.data, config.folds, layout)
                 if s.name == before.name]
    assert after.current and not earlier.current  # its CV counted the searched fold
    assert after.cv == pytest.approx(row["oof"])
    assert after.cv_in_sample == pytest.approx(row["oof"])  # nothing fitted: the same rows
