import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.__main__ import main as cli
from pipeline.base.config import load_config
from pipeline.base.utils import PipelineError
from pipeline.data.images import ImageReadError
from pipeline.stages.folds import make_folds
from pipeline.training.losses import FocalLoss, class_weights
from pipeline.training.lr_path import lr_factor
from tests.conftest import REPO, experiment_dir, folds_csv, make_competition, train

FAST = ["augment.image_size=16", "train.batch_size=4", "train.epochs=2", "train.workers=0",
        "train.lr=0.02", "model.name=resnet20"]


def tiny(tmp_path, labels=None, extra=(), n_splits=2):
    labels = labels or [c for c in ("cat", "dog", "fox") for _ in range(6)]
    data = make_competition(tmp_path / "comp", labels)
    config = load_config(str(data), "resnet20",
                         [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                          f"audit_dir={tmp_path / 'audit'}",  # make_folds' duplicate pass
                          f"folds.n_splits={n_splits}", *FAST, *extra])
    make_folds(config)
    return config


def test_one_fold_writes_every_file(tmp_path):
    config = tiny(tmp_path)
    train(config, [0], force=False)
    out = experiment_dir(config) / "fold0"
    for name in ("config.yaml", "best.pt", "last.pt", "log.csv", "oof.csv", "confusion.csv",
                 "confusion.png", "curves.png"):
        assert (out / name).is_file(), name
    log = pd.read_csv(out / "log.csv")
    assert log["epoch"].tolist() == [1, 2]
    assert {"train_loss", "valid_loss", "accuracy", "macro_f1", "log_loss", "lr", "seconds"} <= set(log)
    folds = pd.read_csv(folds_csv(config), dtype=str)
    oof = pd.read_csv(out / "oof.csv", dtype={"id": str})
    assert oof["id"].tolist() == folds.loc[folds["fold"] == "0", "id"].tolist()
    assert list(oof.columns) == ["id", "label", "cat", "dog", "fox"]
    np.testing.assert_allclose(oof[["cat", "dog", "fox"]].sum(axis=1), 1, atol=1e-5)
    confusion = pd.read_csv(out / "confusion.csv", index_col=0)
    assert confusion[["cat", "dog", "fox"]].to_numpy().sum() == len(oof)
    summary = pd.read_csv(experiment_dir(config) / "summary.csv")
    assert summary["fold"].tolist() == [0]
    assert "out-of-fold" in (experiment_dir(config) / "summary.md").read_text()
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert checkpoint["config"]["model"]["name"] == "resnet20"
    assert checkpoint["classes"] == ["cat", "dog", "fox"]


def test_finished_fold_is_skipped(tmp_path, capsys):
    config = tiny(tmp_path, extra=["train.epochs=1"])
    train(config, [1], force=False)
    stamp = (experiment_dir(config) / "fold1" / "best.pt").stat().st_mtime_ns
    train(config, [1], force=False)
    assert (experiment_dir(config) / "fold1" / "best.pt").stat().st_mtime_ns == stamp
    assert "fold 1: current" in capsys.readouterr().out


def test_changed_config_refuses_to_resume(tmp_path):
    config = tiny(tmp_path, extra=["train.epochs=1"])
    train(config, [0], force=False)
    (experiment_dir(config) / "fold0" / "train.manifest.json").unlink()  # as if killed before the end
    changed = config.model_copy(update={"train": config.train.model_copy(update={"lr": 0.5})})
    with pytest.raises(Exception, match=r"train.lr: 0.02 -> 0.5"):
        train(changed, [0], force=False)


def test_class_weights_match_hand_computed():
    targets = [0] * 6 + [1] * 3 + [2] * 1  # N = 10
    inverse = class_weights(targets, 3, "inverse")
    # w_c = N / (C * n_c): 10/18, 10/9, 10/3
    np.testing.assert_allclose(inverse, [10 / 18, 10 / 9, 10 / 3])
    sqrt = class_weights(targets, 3, "sqrt_inverse")
    raw = 1 / np.sqrt([6, 3, 1])
    np.testing.assert_allclose(sqrt, raw * 10 / (raw * [6, 3, 1]).sum())
    effective = class_weights(targets, 3, "effective", beta=0.9)
    raw = (1 - 0.9) / (1 - 0.9 ** np.array([6, 3, 1]))
    np.testing.assert_allclose(effective, raw * 10 / (raw * [6, 3, 1]).sum())
    for weights in (inverse, sqrt, effective):  # an image weighs 1 on average
        assert np.isclose((weights * [6, 3, 1]).sum(), 10)
    assert class_weights(targets, 3, "none") is None
    np.testing.assert_allclose(class_weights(targets, 3, [1, 2, 3]), [1, 2, 3])
    with pytest.raises(ValueError, match="2 numbers for 3 classes"):
        class_weights(targets, 3, [1, 2])


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    logits = torch.randn(8, 4)
    targets = torch.randint(0, 4, (8,))
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    for smoothing in (0.0, 0.1):
        expected = torch.nn.functional.cross_entropy(logits, targets, weight=weight,
                                                     label_smoothing=smoothing)
        got = FocalLoss(gamma=0.0, weight=weight, label_smoothing=smoothing)(logits, targets)
        if smoothing == 0:
            torch.testing.assert_close(got, expected)
    # focusing lowers the loss of confident, correct predictions
    confident = torch.tensor([[5.0, 0, 0, 0]])
    assert FocalLoss(2.0)(confident, torch.tensor([0])) < FocalLoss(0.0)(confident, torch.tensor([0]))


def test_schedule_warms_up_then_decays():
    config = load_config("digits", "resnet20", ["train.epochs=10", "train.warmup_epochs=2"])
    factor = lr_factor(config.train, steps_per_epoch=5)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(49) < 0.01
    multistep = lr_factor(load_config("digits", "resnet20", [
        "train.scheduler=multistep", "train.milestones=[3,6]", "train.warmup_epochs=0"]).train, 5)
    assert [multistep(s * 5) for s in (0, 3, 6)] == pytest.approx([1, 0.1, 0.01])


def test_an_image_changed_after_folds_stops_training_before_it_starts(tmp_path):
    config = tiny(tmp_path)
    bad = config.data.root_path / "train" / "0005.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(PipelineError, match=r"training images .*make folds"):
        train(config, [0], force=False)
    assert not experiment_dir(config).exists()


def test_corrupt_image_mid_training_is_named(tmp_path, monkeypatch):
    config = tiny(tmp_path)
    bad = config.data.root_path / "train" / "0005.png"
    # broken after the fingerprints were taken (a disk error mid-run): named, not a traceback
    import pipeline.training.experiment as experiment

    fingerprints = experiment.training_inputs

    def break_after_fingerprints(*args):
        result = fingerprints(*args)
        bad.write_bytes(b"\x89PNG garbage")
        return result

    monkeypatch.setattr(experiment, "training_inputs", break_after_fingerprints)
    with pytest.raises(ImageReadError, match=r"0005\.png"):
        train(config, [0], force=False)


def _train_command(data, tmp_path, epochs):
    return [sys.executable, "-m", "pipeline", "train", "--data", str(data), "--model", "resnet20",
            "--folds", "0", "--name", "r", f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
            f"audit_dir={tmp_path / 'audit'}",
            "folds.n_splits=2", "augment.image_size=16", "train.batch_size=8", "train.workers=0",
            f"train.epochs={epochs}", "model.drop_rate=0.2"]


def test_killed_run_resumes_to_identical_result(tmp_path):
    labels = [c for c in ("a", "b") for _ in range(40)]
    data = make_competition(tmp_path / "comp", labels)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for out in (reference, resumed):  # in this process: only the training is killed
        assert cli(["folds", "--data", str(data), f"folds.dir={out / 'folds'}",
                    f"audit_dir={out / 'audit'}", f"runs_dir={out / 'runs'}",
                    "folds.n_splits=2"]) == 0
    assert cli(_train_command(data, reference, 5)[3:]) == 0  # the reference: never killed

    process = subprocess.Popen(_train_command(data, resumed, 5), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = resumed / "runs" / "tiny" / "r" / "fold0" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:  # the initial weights, epoch -1
        time.sleep(0.01)
    initial = last.stat().st_mtime_ns
    while last.stat().st_mtime_ns == initial and time.time() < deadline:  # an epoch's
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log = pd.read_csv(last.with_name("log.csv"))
    assert len(log) < 5, "the run finished before it could be killed"
    assert not last.with_name("oof.csv").exists()

    result = subprocess.run(_train_command(data, resumed, 5), cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert "resuming after epoch" in result.stdout
    for name in ("last.pt", "best.pt"):
        a = torch.load(reference / "runs/tiny/r/fold0" / name, weights_only=True)["model"]
        b = torch.load(resumed / "runs/tiny/r/fold0" / name, weights_only=True)["model"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}: {key}")
    assert ((reference / "runs/tiny/r/fold0/oof.csv").read_bytes()
            == (resumed / "runs/tiny/r/fold0/oof.csv").read_bytes())


def test_head_only_stage_leaves_the_body_untouched(tmp_path):
    config = tiny(tmp_path, extra=["train.epochs=2", "train.head_only_epochs=1"])
    train(config, [0], force=False)
    torch.manual_seed(config.train.seed + 0)  # the fold's seed, as training/parts.py uses
    from pipeline.models.factory import create_model

    initial = create_model("resnet20", 3).state_dict()
    out = experiment_dir(config) / "fold0"
    log = pd.read_csv(out / "log.csv")
    assert log["stage"].tolist() == ["head", "all"]
    # best.pt may be epoch 1 or 2; replay epoch 1 alone to inspect the head stage
    one = tiny(tmp_path / "one", extra=["train.epochs=1", "train.head_only_epochs=1"])
    train(one, [0], force=False)
    after = torch.load(experiment_dir(one) / "fold0" / "last.pt", weights_only=True)["model"]
    body = [k for k in initial if k.endswith("weight") and not k.startswith("fc.")
            and "bn" not in k and "downsample.1" not in k]
    assert body and all(torch.equal(initial[k], after[k]) for k in body)
    assert not torch.equal(initial["fc.weight"], after["fc.weight"])


def test_balanced_sampler_draws_classes_equally():
    from pipeline.training.losses import balanced_sampler

    targets = [0] * 90 + [1] * 10
    drawn = np.asarray(targets)[list(balanced_sampler(targets, torch.Generator().manual_seed(0)))]
    assert len(drawn) == 100 and 35 <= (drawn == 1).sum() <= 65


def test_epochs_are_chosen_by_the_tasks_rule_not_the_submissions_decoder(tmp_path):
    labels = [c for c in ("0", "1", "2") for _ in range(6)]
    config = tiny(tmp_path, labels=labels, extra=["data.metric=qwk", "data.ordinal=true",
                                                  "train.epoch_rule=metric"])
    train(config, [0], force=False)
    log = pd.read_csv(experiment_dir(config) / "fold0" / "log.csv")
    # train.epoch_rule=metric: QWK of a fixed decoding, no thresholds fitted on the fold
    assert "decoded" not in log and (log["selection"] == log["qwk"]).all()
    from pipeline.base.task import best_log_row

    kept = best_log_row(log, "qwk")
    assert kept["selection"] == log["selection"].max()
    assert kept["epoch"] == log.loc[log["selection"].idxmax(), "epoch"]  # the first best
