"""tracking: mlflow|tensorboard: a tiny training's epochs in the real MLflow store and
TensorBoard event files, read back with the trackers' own readers; a killed fold goes on in
the same MLflow run; tracking changes no result and no experiment's name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.__main__ import main as cli
from pipeline.base.config import load_config
from pipeline.experiments.layout import Layout
from pipeline.training import loop
from tests.conftest import train
from tests.test_train import tiny


def mlflow_runs(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store.resolve()}")
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"]
    return client, experiment, client.search_runs([experiment.experiment_id])


def test_mlflow_holds_every_epoch_of_each_fold(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny(tmp_path, extra=["tracking=mlflow", "train.epochs=3"])
    train(config)
    layout = Layout.of(config)
    client, experiment, runs = mlflow_runs(layout.mlflow_store)
    assert experiment.name == f"{config.data.name}/{config.run_name}"
    assert sorted(r.info.run_name for r in runs) == ["fold0", "fold1"]
    for run in runs:
        part = layout.experiment(config.run_name).fold(int(run.info.run_name[-1]))
        log = pd.read_csv(part.log)
        assert run.info.status == "FINISHED"
        assert run.data.params["train.epochs"] == "3" and run.data.params["model.name"] == "resnet20"
        for key in ("train_loss", "valid_loss", "accuracy", "lr"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [1, 2, 3]
            assert [m.value for m in history] == pytest.approx(log[key].tolist())
        artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"log.csv", "confusion.csv", "confusion.png", "curves.png"} <= artefacts


def killed_after(epochs: int, config, monkeypatch) -> None:
    """Fold 0 trained and killed (Ctrl-C) once `epochs` epochs are done and logged."""
    real = loop.Trainer.keep

    def killed(self, epoch, row, improved):
        if epoch == epochs:
            raise KeyboardInterrupt
        real(self, epoch, row, improved)

    with monkeypatch.context() as patched:
        patched.setattr(loop.Trainer, "keep", killed)
        with pytest.raises(KeyboardInterrupt):
            train(config, [0])


def test_a_killed_fold_goes_on_in_its_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny(tmp_path, extra=["tracking=mlflow", "train.epochs=3"])
    killed_after(2, config, monkeypatch)
    _, _, [run] = mlflow_runs(Layout.of(config).mlflow_store)
    assert run.info.status == "FAILED"
    train(config, [0])
    client, _, [again] = mlflow_runs(Layout.of(config).mlflow_store)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]


def test_a_fold_trained_afresh_gets_a_new_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny(tmp_path, extra=["tracking=mlflow"])
    killed_after(1, config, monkeypatch)
    train(config, [0], force=True)  # FORCE=1: from epoch 1, not a resume
    client, _, runs = mlflow_runs(Layout.of(config).mlflow_store)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    [fresh] = [r for r in runs if r.info.status == "FINISHED"]
    assert [m.step for m in client.get_metric_history(fresh.info.run_id, "train_loss")] == [1, 2]


def test_a_tracker_that_fails_is_dropped_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////dev/null/mlflow.db")  # cannot be made
    config = tiny(tmp_path, extra=["tracking=mlflow"])
    train(config, [0])
    assert "tracking=mlflow could not start (FileExistsError" in capsys.readouterr().err
    assert Layout.of(config).experiment(config.run_name).fold(0).train_manifest.is_file()


def test_tensorboard_holds_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny(tmp_path, extra=["tracking=tensorboard"])
    train(config, [0])
    folder = Layout.of(config).tensorboard(config.run_name, "fold0")
    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    log = pd.read_csv(Layout.of(config).experiment(config.run_name).fold(0).log)
    for key in ("train_loss", "valid_loss", "accuracy", "lr"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx(log[key].tolist(), rel=1e-5)
    assert {"confusion", "curves"} <= set(events.Tags()["images"])


def test_tracking_changes_no_result_and_no_name(tmp_path):
    plain = tiny(tmp_path / "a")
    tracked = tiny(tmp_path / "b", extra=["tracking=tensorboard"])
    assert tracked.run_name == plain.run_name
    train(plain, [0])
    train(tracked, [0])
    oof = [pd.read_csv(Layout.of(c).experiment(c.run_name).fold(0).oof) for c in (plain, tracked)]
    np.testing.assert_array_equal(oof[0].filter(["cat", "dog", "fox"]).to_numpy(),
                                  oof[1].filter(["cat", "dog", "fox"]).to_numpy())


def test_a_missing_tracker_package_is_named_before_training(tmp_path, monkeypatch, capsys):
    import importlib.util

    config = tiny(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    data = config.data.config_file
    overrides = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                 f"audit_dir={tmp_path / 'audit'}", "folds.n_splits=2", "augment.image_size=16",
                 "train.epochs=1", "tracking=mlflow"]
    assert cli(["train", "--data", data, "--model", "resnet20", *overrides]) == 1
    assert "tracking=mlflow needs mlflow-skinny: `.venv/bin/pip install mlflow-skinny`" in \
        capsys.readouterr().err
    assert not (tmp_path / "runs" / "comp").exists() or not any(
        (tmp_path / "runs" / "comp").glob("*/fold0/best.pt"))
    assert load_config(data, "resnet20", overrides).tracking == "mlflow"
