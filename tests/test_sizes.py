"""Sizes that change during training (augment.sizes) and prediction above the training size
(tta.image_size)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import pipeline.training.parts as parts_module
from pipeline.__main__ import main as cli
from pipeline.base.config import ConfigError, TTAConfig, load_config
from pipeline.base.utils import PipelineError
from pipeline.inference.predictor import CheckpointPredictor
from tests.conftest import experiment_dir, predict, train, watch_training_passes
from tests.test_train import FAST, tiny

SCHEDULE = ["augment.image_size=16", "augment.sizes={1: 8, 3: 16}", "train.epochs=4"]


def _recording_sizes(monkeypatch) -> list[int]:
    """The input size of every training forward pass of the models built from now on."""
    seen = []
    watch_training_passes(monkeypatch, lambda x: seen.append(x.shape[-1]))
    return seen


def test_a_size_schedule_trains_resumes_bit_identically_across_the_change_and_predicts(
        tmp_path, monkeypatch):
    reference = tiny(tmp_path / "reference", extra=SCHEDULE)
    seen = _recording_sizes(monkeypatch)
    train(reference, [0])
    assert seen == [8] * 4 + [16] * 4  # two batches an epoch (9 rows, 4 a batch)
    log = pd.read_csv(experiment_dir(reference) / "fold0" / "log.csv")
    assert log["size"].tolist() == [8, 8, 16, 16]

    resumed = tiny(tmp_path / "resumed", extra=SCHEDULE)
    at = parts_module.SizedLoaders.at

    def killed_at_the_change(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # a kill after epoch 2, the last at 8 px
        return at(self, epoch)

    monkeypatch.setattr(parts_module.SizedLoaders, "at", killed_at_the_change)
    with pytest.raises(KeyboardInterrupt):
        train(resumed, [0])
    monkeypatch.setattr(parts_module.SizedLoaders, "at", at)
    train(resumed, [0])  # goes on from last.pt after epoch 2, at 16 px
    for name in ("last.pt", "best.pt"):
        a = torch.load(experiment_dir(reference) / "fold0" / name, weights_only=True)["model"]
        b = torch.load(experiment_dir(resumed) / "fold0" / name, weights_only=True)["model"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}: {key}")
    predict(resumed, [0])
    probs = pd.read_csv(experiment_dir(resumed) / "fold0" / "test_probs.csv")
    assert len(probs) == 4 and probs.filter(regex="cat|dog|fox").sum(axis=1).round(5).eq(1).all()


def test_a_schedule_must_end_at_the_size_predicted_at(tmp_path):
    data = tiny(tmp_path).data.config_file
    preset = load_config(data, "resnet20", ["augment.image_size=32", "augment.sizes=progressive",
                                            "train.epochs=7"])
    assert preset.augment.sizes == {1: 16, 4: 32}  # what the run's settings hold and name
    assert "sizes1-16-4-32" in preset.run_name
    with pytest.raises(ConfigError, match=r"set augment.image_size=32"):
        load_config(data, "resnet20", ["augment.image_size=16", "augment.sizes={1: 32, 3: 16}"])
    with pytest.raises(ConfigError, match=r"starts at epoch 1"):
        load_config(data, "resnet20", ["augment.image_size=16", "augment.sizes={2: 8, 3: 16}"])
    late = tiny(tmp_path / "late", extra=["augment.image_size=16", "augment.sizes={1: 8, 20: 16}",
                                          "train.epochs=10"])
    with pytest.raises(PipelineError, match=r"from epoch 20 begin after the last epoch \(10\)"):
        train(late, [0])  # refused before a fold starts (a refit of fewer epochs may end early)


def test_a_transform_of_a_fixed_size_is_refused_before_training(tmp_path):
    """The CIFAR recipe pads to 40 and crops 32 px: at a schedule's 16 px phase it would train
    at 32 anyway. Refused before any fold starts, with what to change."""
    config = tiny(tmp_path, extra=["augment.image_size=32", "augment.sizes=progressive",
                                   "augment.train=[{PadIfNeeded: {min_height: 40, min_width: 40}},"
                                   " {RandomCrop: {height: 32, width: 32}}]"])
    with pytest.raises(PipelineError, match=r"turns 16 px images into 32x32.*leave augment.sizes"):
        train(config, [0])
    assert not (experiment_dir(config) / "fold0").exists()


def test_tta_above_the_training_size_reads_and_predicts_at_it(tmp_path):
    config = tiny(tmp_path, extra=["train.epochs=1"])
    train(config, [0])
    best = experiment_dir(config) / "fold0" / "best.pt"
    paths = sorted((config.data.root_path / "test").glob("*.png"))
    plain = CheckpointPredictor(best, TTAConfig())
    larger = CheckpointPredictor(best, TTAConfig(image_size=24))
    assert plain.augment.image_size == 16 and larger.augment.image_size == 24
    seen = []
    larger.model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-1]))
    probs = larger.predict(paths, "test").probs
    assert seen and set(seen) == {24} and probs.shape == (4, 3)
    assert not torch.allclose(torch.as_tensor(probs),
                              torch.as_tensor(plain.predict(paths, "test").probs))


def test_a_refit_shorter_than_the_schedule_trains_and_predicts(tmp_path):
    """The refit trains the folds' schedule for the epochs it is given (refit.epochs=2: both at
    8 px, as the folds' first two epochs were) and its saved settings load back to predict."""
    config = tiny(tmp_path, extra=SCHEDULE)
    train(config)
    data = str(tmp_path / "comp" / "tiny.yaml")
    where = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
             f"audit_dir={tmp_path / 'audit'}", f"submissions_dir={tmp_path / 'subs'}",
             "folds.n_splits=2", *FAST, *SCHEDULE, "refit.epochs=2"]
    assert cli(["refit", "--data", data, "--model", "resnet20", *where]) == 0
    full = experiment_dir(config) / "full"
    assert pd.read_csv(full / "log.csv")["size"].tolist() == [8, 8]
    assert len(pd.read_csv(full / "test_probs.csv")) == 4


def test_a_schedule_is_replaced_or_turned_off_by_an_override_not_merged(tmp_path):
    """The remedies ("start them by epoch N", "leave augment.sizes out") work through ARGS on an
    experiment file that holds a schedule: an override replaces it whole."""
    data = tiny(tmp_path).data.config_file
    experiment = tmp_path / "sched.yaml"
    experiment.write_text("model: {name: resnet20}\naugment: {image_size: 32, sizes: {1: 16, 3: 32}}"
                          "\ntrain: {epochs: 6}\n")
    for off in ("augment.sizes={}", "augment.sizes=null"):
        assert load_config(data, str(experiment), [off]).augment.sizes == {}
    shorter = load_config(data, str(experiment), ["train.epochs=2", "augment.sizes={1: 16, 2: 32}"])
    assert shorter.augment.sizes == {1: 16, 2: 32}
    with pytest.raises(ConfigError, match=r"greater than 0"):
        load_config(data, "resnet20", ["train.class_weights=[0, 1, 1]"])
