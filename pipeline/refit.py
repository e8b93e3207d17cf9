"""Full-data refit: train on every labelled row for a fixed number of epochs, predict the test set.

    python -m pipeline refit --data digits --model resnet18 [refit.epochs=12]
    make refit MODEL=resnet18

The epoch count comes from cross-validation: the median of the folds' best epochs (from their
log.csv), unless `refit.epochs` is set. The learning rate walks the path the folds walked up to
that epoch (train.FoldPath): the folds' warm-up, milestones and cosine length, not a schedule
squeezed into the refit's fewer epochs; each refit epoch has K/(K-1) times the folds' steps. Without a validation set nothing can pick a best epoch,
so the model of the last epoch is the result. Writes runs/<competition>/<model>/full/
(config.yaml, best.pt = the last epoch, last.pt, log.csv, test_probs.csv with the configured TTA,
train.manifest.json and predict.manifest.json) and a submission of its own,
submissions/<competition>/<model>_refit.csv. A refit made from other inputs (settings, rows,
epoch count) is refused; FORCE=1 retrains it. `make ensemble` joins the refit to the model's
folds with weight `ensemble.refit_weight`, and names it as unvalidated: no fold scored it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import distributed
from pipeline.config import Config, save_config
from pipeline.engine import resolve_device
from pipeline.folds import read_folds
from pipeline.predict import predict_dir, read_probs, read_test_set
from pipeline.provenance import fingerprint, freshness, manifest_path, refuse_stale, write_manifest
from pipeline.submission import build_submission, score_against_solution, write_submission
from pipeline.train import (FoldPath, FoldTrainer, Rows, best_log_row, current_folds, fold_dir,
                            preflight, pseudo_rows, stale_remedy, start_experiment,
                            steps_per_epoch,
                            training_inputs)
from pipeline.utils import PipelineError, format_table

REFIT_SEED_OFFSET = 1000  # the refit's seed differs from every fold's (seed + fold)


def best_epochs(logs: list[pd.DataFrame], metric: str) -> list[int]:
    """Each log's best epoch (1-based), by the metric (as the folds chose their best.pt)."""
    return [int(best_log_row(log, metric)["epoch"]) for log in logs if not log.empty]


def current_fold_logs(config: Config, folds: pd.DataFrame) -> list[pd.DataFrame]:
    """The log.csv of each current fold: a stale fold's log says nothing about these settings."""
    return [pd.read_csv(fold_dir(config, k) / "log.csv") for k in current_folds(config, folds)]


def refit_epochs(config: Config, folds: pd.DataFrame,
                 validated: list[int] | None = None) -> tuple[int, str]:
    """(epochs, where the number came from); `validated`: the current folds' best epochs, when
    the caller has read them already."""
    if config.refit.epochs is not None:
        return config.refit.epochs, "refit.epochs"
    epochs = validated if validated is not None else best_epochs(
        current_fold_logs(config, folds), config.data.metric)
    if not epochs:
        raise PipelineError(f"no current trained fold in {config.run_dir} to take the epoch count "
                            f"from: run `make train MODEL={config.run_name}` first, or set "
                            f"ARGS=refit.epochs=N")
    return int(round(float(np.median(epochs)))), f"median best epoch of folds {epochs}"


REFIT_OUTPUTS = ("best.pt", "log.csv", "config.yaml")


def train_full(config: Config, folds: pd.DataFrame, inputs: dict[str, str],
               details: dict[str, Any], force: bool, path: FoldPath | None = None) -> Path:
    """Train on all labelled rows; returns the output folder (runs/<c>/<model>/full).

    A current refit is kept; one made from other inputs is refused (FORCE=1 retrains it).
    Under torchrun every rank trains its share; rank 0 alone prepares the folder and writes.
    """
    out_dir = fold_dir(config, -1)
    fresh = freshness(manifest_path(out_dir, "train"), inputs, details)
    if fresh.current and not force:
        print(f"{out_dir}: refit is current (FORCE=1 retrains)")
        return out_dir
    if fresh.state == "stale" and not force:
        raise refuse_stale(f"the refit {out_dir}", fresh, stale_remedy(config, "the refit"))
    preflight(config)
    if distributed.is_main():
        if force and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    distributed.barrier()
    trainer = FoldTrainer(config, out_dir, Rows.of(folds), None,
                          config.train.seed + REFIT_SEED_OFFSET, "full", inputs, path,
                          pseudo=pseudo_rows(config, "full"))
    trainer.setup()
    trainer.fit()
    if distributed.is_main():
        write_manifest(manifest_path(out_dir, "train"), "refit", inputs,
                       [out_dir / name for name in REFIT_OUTPUTS],
                       {**details, "rows": len(folds), "unvalidated": True})
    distributed.barrier()
    return out_dir


def refit_config(config: Config, epochs: int) -> Config:
    """The fold runs' config for `epochs` epochs, without early stopping (nothing to validate)."""
    train = config.train.model_copy(update={"epochs": epochs, "early_stopping": 0})
    return config.model_copy(update={"train": train})


def fold_path(config: Config, folds: pd.DataFrame, epochs: int,
              validated: list[int]) -> FoldPath:
    """The folds' learning-rate path up to the epoch CV chose (the median of the current folds'
    best epochs `validated`; `epochs` when there are none), for the refit to walk again."""
    train_sizes = [int((folds["fold"] != k).sum()) for k in folds["fold"].unique()]
    steps = steps_per_epoch(int(np.median(train_sizes)), config.train.batch_size,
                            config.train.max_batches)
    until = float(np.median(validated)) if validated else float(epochs)
    return FoldPath(steps_per_epoch=steps, epochs=config.train.epochs, until=until)


def refit_inputs(config: Config, folds: pd.DataFrame) -> tuple[dict, dict, int, str, FoldPath]:
    """(inputs, details, epochs, source, path): the fold runs' inputs plus the refit's epoch
    count and the learning-rate path it walks."""
    validated = best_epochs(current_fold_logs(config, folds), config.data.metric)
    epochs, source = refit_epochs(config, folds, validated)
    path = fold_path(config, folds, epochs, validated)
    inputs, details = training_inputs(config, folds)
    inputs["epochs"] = fingerprint([epochs, source, path.steps_per_epoch, path.epochs, path.until])
    details = {**details, "epochs": epochs, "epochs_from": source,
               "lr_path": {"fold_steps_per_epoch": path.steps_per_epoch,
                           "fold_epochs": path.epochs, "until_fold_epoch": path.until}}
    return inputs, details, epochs, source, path


def run_refit(config: Config, force: bool) -> dict:
    folds = read_folds(config)
    inputs, details, epochs, source, path = refit_inputs(config, folds)
    print(f"{config.run_name}: refit on all labelled rows for {epochs} epochs ({source}), walking "
          f"the folds' learning-rate path to their epoch {path.until:g} of {path.epochs}")
    # No early stopping without a validation set; the schedule walks the folds' (FoldPath).
    refit = refit_config(config, epochs)
    start_experiment(config)  # the experiment's settings, not the refit's epoch count
    out_dir = train_full(refit, folds, inputs, details, force, path)
    test_ids, test_fingerprint = read_test_set(config.data)
    predict_dir(refit, out_dir, test_ids, test_fingerprint, None, force)
    distributed.barrier()
    if not distributed.is_main():
        return {}
    probs = read_probs(out_dir / "test_probs.csv")[config.data.classes].to_numpy()
    frame = build_submission(config.data, test_ids, probs)
    path = write_submission(frame, config.submissions_path / f"{config.run_name}_refit.csv",
                            config.data)
    write_manifest(path.with_suffix(".manifest.json"), "submission",
                   {"members": fingerprint({"refit": (out_dir / "predict.manifest.json")
                                            .read_text()})},
                   [path], {"members": [config.run_name], "refit only": True,
                            "unvalidated": True})
    result = {"run": config.run_name, "epochs": epochs, "submission": str(path)}
    test_score = score_against_solution(config.data, frame)
    if test_score is not None:
        result[f"test {config.data.metric}"] = test_score
    print(format_table([list(result.values())], list(result)))
    print("note: a refit has no validation fold: its score is unknown (unvalidated)")
    return result


def main(args) -> None:
    from pipeline.train import seed_configs

    if args.model is None:
        raise PipelineError("refit needs a model: make refit MODEL=resnet18")
    for config in seed_configs(args):
        with distributed.session(resolve_device(config.train.device)):
            run_refit(config, args.force)
