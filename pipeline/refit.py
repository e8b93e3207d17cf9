"""Full-data refit: train on every labelled row for a fixed number of epochs, predict the test set.

    python -m pipeline refit --data digits --model resnet18 [refit.epochs=12]
    make refit MODEL=resnet18

The epoch count comes from cross-validation: the median of the folds' best epochs (from their
log.csv), unless `refit.epochs` is set. Without a validation set nothing can pick a best epoch,
so the model of the last epoch is the result. Writes runs/<model>/full/ (config.yaml, best.pt =
the last epoch, last.pt, log.csv, test_probs.csv with the configured TTA) and a submission of
its own, submissions/<model>_refit.csv. `make ensemble` then joins the refit to the model's
folds with weight `ensemble.refit_weight`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import distributed
from pipeline.config import Config, save_config
from pipeline.data import load_test_ids
from pipeline.engine import load_checkpoint, resolve_device
from pipeline.folds import read_folds
from pipeline.metrics import higher_is_better
from pipeline.predict import predict_dir, read_probs
from pipeline.submission import build_submission, score_against_solution, write_submission
from pipeline.train import FoldTrainer, Rows, fold_dir
from pipeline.utils import PipelineError, format_table

REFIT_SEED_OFFSET = 1000  # the refit's seed differs from every fold's (seed + fold)


def best_epochs(config: Config) -> list[int]:
    """Each trained fold's best epoch (1-based), read from its log.csv."""
    metric = config.data.metric
    epochs = []
    for log_path in sorted(config.run_dir.glob("fold*/log.csv")):
        log = pd.read_csv(log_path)
        if metric not in log or log.empty:
            continue
        best = log[metric].idxmax() if higher_is_better(metric) else log[metric].idxmin()
        epochs.append(int(log.loc[best, "epoch"]))
    return epochs


def refit_epochs(config: Config) -> tuple[int, str]:
    """(epochs, where the number came from)."""
    if config.refit.epochs is not None:
        return config.refit.epochs, "refit.epochs"
    epochs = best_epochs(config)
    if not epochs:
        raise PipelineError(f"no fold logs in {config.run_dir} to take the epoch count from: "
                            f"run `make train MODEL={config.run_name}` first, or set "
                            f"ARGS=refit.epochs=N")
    return int(round(float(np.median(epochs)))), f"median best epoch of folds {epochs}"


def _finished(out_dir: Path) -> bool:
    last = out_dir / "last.pt"
    return last.is_file() and bool(load_checkpoint(last).get("finished"))


def train_full(config: Config, force: bool) -> Path:
    """Train on all labelled rows; returns the output folder (runs/<model>/full).

    Under torchrun every rank trains its share; rank 0 alone prepares the folder and writes.
    """
    out_dir = fold_dir(config, -1)
    if distributed.is_main():
        if force and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    if _finished(out_dir):
        print(f"{out_dir}: refit finished earlier (FORCE=1 retrains)")
        return out_dir
    if distributed.is_main():
        save_config(config, out_dir / "config.yaml")
    rows = Rows.of(read_folds(config))
    trainer = FoldTrainer(config, out_dir, rows, None, config.train.seed + REFIT_SEED_OFFSET, "full")
    trainer.setup()
    trainer.fit()
    return out_dir


def run_refit(config: Config, force: bool) -> dict:
    epochs, source = refit_epochs(config)
    print(f"{config.run_name}: refit on all labelled rows for {epochs} epochs ({source})")
    # The schedule (warm-up, cosine) spans the refit's own epochs; no early stopping without
    # a validation set.
    train = config.train.model_copy(update={"epochs": epochs, "early_stopping": 0})
    config = config.model_copy(update={"train": train})
    out_dir = train_full(config, force)
    test_ids = load_test_ids(config.data)
    predict_dir(config, out_dir, test_ids, None, force)
    distributed.barrier()
    if not distributed.is_main():
        return {}
    probs = read_probs(out_dir / "test_probs.csv")[config.data.classes].to_numpy()
    frame = build_submission(config.data, test_ids, probs)
    path = write_submission(frame, Path(config.submissions_dir) / f"{config.run_name}_refit.csv",
                            config.data)
    result = {"run": config.run_name, "epochs": epochs, "submission": str(path)}
    test_score = score_against_solution(config.data, frame)
    if test_score is not None:
        result[f"test {config.data.metric}"] = test_score
    print(format_table([list(result.values())], list(result)))
    return result


def main(args) -> None:
    from pipeline.config import load_config

    if args.model is None:
        raise PipelineError("refit needs a model: make refit MODEL=resnet18")
    config = load_config(args.data, args.model, args.overrides)
    with distributed.session(resolve_device(config.train.device)):
        run_refit(config, args.force)
