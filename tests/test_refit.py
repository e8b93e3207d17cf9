import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.refit import refit_epochs, run_refit
from pipeline.train import run_training
from pipeline.utils import PipelineError
from tests.test_train import tiny


def write_log(path, accuracies):
    path.mkdir(parents=True)
    pd.DataFrame({"epoch": range(1, len(accuracies) + 1), "accuracy": accuracies,
                  "train_loss": 0.1}).to_csv(path / "log.csv", index=False)


def test_epochs_are_the_median_best_epoch_of_the_folds(tmp_path):
    config = load_config("digits", "resnet20", [f"runs_dir={tmp_path}"])
    write_log(config.run_dir / "fold0", [0.5, 0.7, 0.9, 0.8])  # best epoch 3
    write_log(config.run_dir / "fold1", [0.5, 0.6, 0.7, 0.8, 0.9, 0.85])  # best epoch 5
    write_log(config.run_dir / "fold2", [0.6, 0.95, 0.9])  # best epoch 2
    assert refit_epochs(config) == (3, "median best epoch of folds [3, 5, 2]")
    fixed = load_config("digits", "resnet20", [f"runs_dir={tmp_path}", "refit.epochs=7"])
    assert refit_epochs(fixed) == (7, "refit.epochs")


def test_log_loss_competitions_pick_the_lowest_epoch(tmp_path):
    config = load_config("digits", "resnet20", [f"runs_dir={tmp_path}", "data.metric=log_loss"])
    pd.DataFrame({"epoch": [1, 2, 3], "log_loss": [0.9, 0.3, 0.5]}).to_csv(
        (config.run_dir / "fold0").mkdir(parents=True) or config.run_dir / "fold0" / "log.csv",
        index=False)
    assert refit_epochs(config)[0] == 2


def test_no_fold_logs_is_a_clear_error(tmp_path):
    config = load_config("digits", "resnet20", [f"runs_dir={tmp_path}"])
    with pytest.raises(PipelineError, match="run `make train MODEL=resnet20` first"):
        refit_epochs(config)


def test_refit_trains_on_all_rows_and_writes_a_submission(tmp_path):
    config = tiny(tmp_path, extra=["train.epochs=2", f"submissions_dir={tmp_path / 'subs'}"])
    run_training(config, None, force=False)
    result = run_refit(config, force=False)
    full = config.run_dir / "full"
    log = pd.read_csv(full / "log.csv")
    assert len(log) == result["epochs"] and "valid_loss" not in log
    test = pd.read_csv(full / "test_probs.csv", dtype={"id": str})
    assert test["id"].tolist() == ["t000", "t001", "t002", "t003"]
    submission = pd.read_csv(tmp_path / "subs" / "resnet20_refit.csv", dtype=str)
    assert list(submission.columns) == ["id", "label"]
    assert set(submission["label"]) <= {"cat", "dog", "fox"}
    stamp = (full / "best.pt").stat().st_mtime_ns
    run_refit(config, force=False)  # finished: not retrained
    assert (full / "best.pt").stat().st_mtime_ns == stamp
