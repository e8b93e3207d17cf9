import pandas as pd
import pytest

from pipeline.base.config import load_config
from pipeline.base.task import best_epochs
from pipeline.base.utils import PipelineError
from pipeline.experiments.freshness import fold_best_epochs, refit_epochs
from pipeline.experiments.layout import Layout
from pipeline.stages.refit import run_refit
from tests.conftest import experiment_dir, read_folds_of, train
from tests.test_train import tiny


def log(accuracies, metric="accuracy"):
    return pd.DataFrame({"epoch": range(1, len(accuracies) + 1), metric: accuracies,
                         "valid_loss": 0.5, "train_loss": 0.1})


def test_epochs_are_the_median_best_epoch_of_the_folds():
    logs = [log([0.5, 0.7, 0.9, 0.8]),  # best epoch 3
            log([0.5, 0.6, 0.7, 0.8, 0.9, 0.85]),  # best epoch 5
            log([0.6, 0.95, 0.9])]  # best epoch 2
    assert best_epochs(logs, "accuracy") == [3, 5, 2]


def test_log_loss_competitions_pick_the_lowest_epoch():
    assert best_epochs([log([0.9, 0.3, 0.5], "log_loss")], "log_loss") == [2]


def test_an_undefined_metric_picks_the_lowest_validation_loss():
    frame = log([float("nan")] * 3, "roc_auc").assign(valid_loss=[0.9, 0.4, 0.6])
    assert best_epochs([frame], "roc_auc") == [2]


def test_epoch_count_from_current_folds_or_the_setting(tmp_path):
    config = tiny(tmp_path, extra=["train.epochs=2"])
    exp = Layout.of(config).experiment(config.run_name)
    with pytest.raises(PipelineError, match=rf"run `make train MODEL=resnet20-\S+ "
                                            rf"DATA={config.data.name}` first"):
        refit_epochs(config.refit, config.run_name, [], config.data.name)
    fixed = config.model_copy(update={"refit": config.refit.model_copy(update={"epochs": 7})})
    assert refit_epochs(fixed.refit, fixed.run_name, [], fixed.data.name) == (7, "refit.epochs")
    train(config, None, force=False)
    folds = sorted(read_folds_of(config)["fold"].unique())
    epochs, source = refit_epochs(config.refit, config.run_name,
                                  fold_best_epochs(exp, folds, "accuracy"), config.data.name)
    assert 1 <= epochs <= 2 and source.startswith("median best epoch of folds")


def test_refit_trains_on_all_rows_and_writes_a_submission(tmp_path):
    config = tiny(tmp_path, extra=["train.epochs=2", f"submissions_dir={tmp_path / 'subs'}"])
    train(config, None, force=False)
    result = run_refit(config, force=False)
    full = experiment_dir(config) / "full"
    log = pd.read_csv(full / "log.csv")
    assert len(log) == result["epochs"] and "valid_loss" not in log
    test = pd.read_csv(full / "test_probs.csv", dtype={"id": str})
    assert test["id"].tolist() == ["t000", "t001", "t002", "t003"]
    submission = pd.read_csv(tmp_path / "subs" / "tiny" / f"{config.run_name}_refit.csv", dtype=str)
    assert list(submission.columns) == ["id", "label"]
    assert set(submission["label"]) <= {"cat", "dog", "fox"}
    stamp = (full / "best.pt").stat().st_mtime_ns
    run_refit(config, force=False)  # finished: not retrained
    assert (full / "best.pt").stat().st_mtime_ns == stamp


def test_refit_walks_the_folds_learning_rate_path():
    from pipeline.training.lr_path import FoldPath, lr_factor

    # folds: 30 epochs of 10 steps, cosine with 1 warm-up epoch; CV chose epoch 18
    folds = load_config("digits", "resnet20", ["train.epochs=30", "train.warmup_epochs=1"])
    fold = lr_factor(folds.train, 10)
    refit = folds.model_copy(update={"train": folds.train.model_copy(update={"epochs": 18})})
    path = FoldPath(steps_per_epoch=10, epochs=30, until=18)
    walked = lr_factor(refit.train, 12, path)  # the full data: 12 steps per epoch (K=6)
    for refit_step in (0, 11, 100, 215):  # the refit's steps map onto the folds' by progress
        assert walked(refit_step) == pytest.approx(fold(refit_step * 18 * 10 / (18 * 12)))
    assert walked(18 * 12 - 1) == pytest.approx(fold(180 - 1), abs=1e-3)
    assert walked(18 * 12 - 1) > 0.3  # ends where the validated models were, not decayed to 0
    squeezed = lr_factor(refit.train, 12)  # the old way: the whole cosine in 18 epochs
    assert squeezed(18 * 12 - 1) < 0.01

    # multistep: the milestones stay at the folds' epochs (a refit past them decays there)
    steps = load_config("digits", "resnet20", ["train.epochs=30", "train.warmup_epochs=0",
                                               "train.scheduler=multistep",
                                               "train.milestones=[20,25]"])
    longer = steps.model_copy(update={"train": steps.train.model_copy(update={"epochs": 22})})
    walked = lr_factor(longer.train, 10, FoldPath(10, 30, until=22))
    assert walked(19 * 10) == pytest.approx(1.0) and walked(21 * 10) == pytest.approx(0.1)
