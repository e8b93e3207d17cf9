"""The task (pipeline/base/task.py): resolved once from the config, read by training alone, in the
training fingerprint; and a best-epoch rule that never fits on the rows it scores (issue 25)."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.base.config import load_config
from pipeline.base.task import Decoder, EpochRule, Head, Task, best_log_row
from pipeline.ensembling.decode import cross_fitted_score, decoded_score
from pipeline.experiments.freshness import freshness, training_inputs
from pipeline.stages.folds import make_folds
from pipeline.training.loop import selection_value
from tests.conftest import experiment_dir, make_competition, read_folds_of, train

FAST = ["augment.image_size=16", "train.batch_size=4", "train.epochs=3", "train.workers=0",
        "model.name=resnet20"]
GRADES = ("0", "1", "2", "3", "4")


def ordinal(tmp_path, extra=(), data_extra=None):
    labels = [g for g in GRADES[:3] for _ in range(6)]
    path = make_competition(tmp_path / "comp", labels, metric="qwk", ordinal=True,
                            **(data_extra or {}))
    return path, [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                  f"audit_dir={tmp_path / 'audit'}", "folds.n_splits=2", *FAST, *extra]


def test_the_task_is_resolved_from_the_config(tmp_path):
    path, overrides = ordinal(tmp_path)
    task = load_config(str(path), "resnet20", overrides).task
    assert isinstance(task, Task)
    # ordinal competitions default to the regression head (config.ORDINAL_DEFAULTS)
    assert (task.head, task.epoch_rule, task.metric) == (Head.REGRESSION, EpochRule.LOSS, "qwk")
    assert task.label_decoder is Decoder.THRESHOLDS and task.higher_is_better
    binary = make_competition(tmp_path / "bin", ["a", "b"] * 4, metric="binary_f1",
                              positive_class="a")
    task = load_config(str(binary), "resnet20", ["train.epoch_rule=cross_fit"]).task
    assert (task.positive, task.label_decoder, task.epoch_rule) == (
        0, Decoder.CUTOFF, EpochRule.CROSS_FIT)


def test_cross_fitting_never_scores_a_row_with_what_it_fitted_on():
    """On noise, thresholds fitted and scored on the same rows look good; cross-fitted, not."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        targets = rng.integers(0, 5, 60)
        probs = rng.dirichlet(np.ones(5), 60)
        in_sample = decoded_score("thresholds", "qwk", targets, probs)
        crossed = cross_fitted_score("thresholds", "qwk", targets, probs)
        assert crossed < in_sample - 0.15, seed  # in sample, noise looks like skill
    # a perfect model stays perfect under cross-fitting
    perfect = np.eye(5)[targets] * 0.9 + 0.02
    assert cross_fitted_score("thresholds", "qwk", targets, perfect) == pytest.approx(1.0)


def test_each_rule_scores_what_it_says():
    targets = np.array([0, 1, 2, 2])
    probs = np.array([[0.6, 0.4, 0], [0.1, 0.5, 0.4], [0, 0.2, 0.8], [0.1, 0.6, 0.3]])
    base = Task(("0", "1", "2"), "accuracy", False, 1, epoch_rule=EpochRule.METRIC)
    assert selection_value(base, targets, [probs], loss=0.7) == pytest.approx(0.75)
    lossy = Task(("0", "1", "2"), "accuracy", False, 1, epoch_rule=EpochRule.LOSS)
    assert selection_value(lossy, targets, [probs], loss=0.7) == 0.7


def _layout(config):
    from pipeline.experiments.layout import Layout

    return Layout.of(config)


def test_the_ensembles_decoder_and_the_submission_kind_leave_trained_folds_untouched(tmp_path):
    """Training reads the task alone: another ensemble.decode or submission kind is the same
    training (the same identity, current, the same best epoch), never another rule's best.pt."""
    path, overrides = ordinal(tmp_path)
    config = load_config(str(path), "resnet20", overrides, name="mine")
    make_folds(config)
    train(config, [0])
    part = _layout(config).experiment("mine").fold(0)
    kept = best_log_row(pd.read_csv(part.log), "qwk")["epoch"]
    best_pt = part.best.read_bytes()

    # the ensemble decodes by argmax now, and the sample submission holds probabilities
    sample = pd.read_csv(path.parent / "sample_submission.csv", dtype=str)
    pd.DataFrame({"id": sample["id"], **{g: 0.2 for g in GRADES[:3]}}).to_csv(
        path.parent / "sample_submission.csv", index=False)
    later = load_config(str(path), "resnet20", [*overrides, "ensemble.decode=argmax",
                                                "data.submission=probabilities"], name="mine")
    assert later.run_name == config.run_name
    inputs, details = training_inputs(later, read_folds_of(later), _layout(later))
    assert freshness(part.train_manifest, inputs, details).current
    train(later, [0])  # current: skipped, best.pt as it was
    assert part.best.read_bytes() == best_pt
    assert best_log_row(pd.read_csv(part.log), "qwk")["epoch"] == kept


@pytest.mark.parametrize("change, named", [
    ("train.epoch_rule=metric", "train.epoch_rule"),
    ("model.head=both", "model.head"),
])
def test_a_changed_epoch_rule_or_head_reports_the_folds_stale(tmp_path, change, named):
    path, overrides = ordinal(tmp_path, ["train.epochs=1"])
    config = load_config(str(path), "resnet20", overrides, name="mine")
    make_folds(config)
    train(config, [0])
    later = load_config(str(path), "resnet20", [*overrides, change], name="mine")
    inputs, details = training_inputs(later, read_folds_of(later), _layout(later))
    state = freshness(_layout(later).experiment("mine").fold(0).train_manifest, inputs, details)
    assert state.state == "stale" and named in state.why()
    # without NAME=, the changed setting is another experiment altogether
    assert load_config(str(path), "resnet20", [*overrides, change]).run_name != config.run_name


def test_the_positive_class_is_a_training_setting(tmp_path):
    """It changes which epoch a binary F1 competition keeps, so it is in the fingerprint."""
    binary = make_competition(tmp_path / "bin", ["a", "b"] * 4, metric="binary_f1")
    common = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
              f"audit_dir={tmp_path / 'audit'}", "folds.n_splits=2"]
    first = load_config(str(binary), "resnet20", common)
    make_folds(first)
    other = load_config(str(binary), "resnet20", [*common, "data.positive_class=a"])
    layout = _layout(first)
    assert training_inputs(first, read_folds_of(first), layout)[0]["settings"] != \
        training_inputs(other, read_folds_of(other), layout)[0]["settings"]


def test_the_log_marks_the_epoch_the_rule_kept(tmp_path):
    path, overrides = ordinal(tmp_path, ["train.epoch_rule=loss"])
    config = load_config(str(path), "resnet20", overrides)
    make_folds(config)
    train(config, [0])
    log = pd.read_csv(experiment_dir(config) / "fold0" / "log.csv")
    assert "decoded" not in log and {"selection", "best"} <= set(log)
    assert (log["selection"] == log["valid_loss"]).all()  # the loss rule scores the loss
    kept = best_log_row(log, "qwk")
    assert kept["valid_loss"] == log["valid_loss"].min()


# --------------------------------------------------------------------------------------------
# The tiny ordinal competition of issue 25: five grades of coloured discs


DISC_COLOURS = ((0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))


def write_discs(root, per_grade=12, size=16, seed=0):
    """A disc per image whose colour (BGR) is its grade, at a random place, on
    noise; 12 per grade, 3 test images per grade; returns the config's path."""
    rng = np.random.default_rng(seed)
    rows = []
    for part, count in (("train", per_grade), ("test", 3)):
        for grade, colour in enumerate(DISC_COLOURS):
            for i in range(count):
                image = rng.integers(0, 30, (size, size, 3)).astype(np.uint8)
                centre = tuple(int(c) for c in rng.integers(5, size - 5, 2))
                cv2.circle(image, centre, 5, colour, -1)
                image_id = f"{part[:2]}{grade}{i:02d}"
                (root / part).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / part / f"{image_id}.png"), image)
                rows.append((part, image_id, str(grade)))
    frame = pd.DataFrame(rows, columns=["part", "id", "label"])
    frame[frame["part"] == "train"][["id", "label"]].to_csv(root / "train.csv", index=False)
    test = frame[frame["part"] == "test"]
    test[["id"]].to_csv(root / "test.csv", index=False)
    test.assign(label="0")[["id", "label"]].to_csv(root / "sample_submission.csv", index=False)
    config = {"name": "discs", "root": str(root), "classes": list(GRADES), "metric": "qwk",
              "ordinal": True}
    (root / "discs.yaml").write_text(yaml.safe_dump(config))
    return root / "discs.yaml"


@pytest.mark.slow
def test_the_default_rule_keeps_trained_epochs_on_the_tiny_ordinal_competition(tmp_path):
    """Issue 25: under the in-sample decoded rule the folds kept epochs 3-5 (OOF QWK 0.81)."""
    path = write_discs(tmp_path / "discs")
    config = load_config(str(path), "resnet20",
                         [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                          f"audit_dir={tmp_path / 'audit'}",
                          "folds.n_splits=3", "augment.image_size=16", "train.epochs=8", "train.batch_size=8",
                          "train.workers=0"])
    make_folds(config)
    train(config)
    oof = pd.concat([pd.read_csv(experiment_dir(config) / f"fold{k}" / "oof.csv", dtype={"id": str})
                     for k in range(3)])
    assert config.task.score_frame(oof) >= 0.95
