"""Predicting an experiment's parts: each fold's test set and its own validation fold.

    predict_experiment(config, layout, folds, None, force, read_test_set(config.data))
                                                             # every current fold: `make predict`

For fold k `predict_part` writes the test set's probabilities (fold<k>/test_probs.csv) and, again,
its own validation fold's (oof_tta.csv), so the out-of-fold score with and without TTA can be
compared; predict.manifest.json records the checkpoint, test set and TTA settings they were made
from, so a retrained fold, a new test image or new TTA settings are predicted again. TTA settings
are read at predict time: a new `TTA=` needs no retraining. `make predict`, `make refit` and `make
pseudo` predict through here.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from pipeline.base import distributed
from pipeline.base.config import Config, PredictConfig, TTAConfig
from pipeline.base.log import log
from pipeline.base.task import Scorer
from pipeline.base.utils import PipelineError, make_command, write_csv_atomic
from pipeline.data.tables import test_image_paths, train_image_paths
from pipeline.experiments.freshness import (
    current_folds,
    fold_numbers,
    predict_inputs,
    train_freshness,
    training_inputs,
)
from pipeline.experiments.layout import Experiment, Layout, Part
from pipeline.experiments.probfiles import probability_frame, read_probs
from pipeline.experiments.runner import Step, on_main, run_step, show_table, stage_lock
from pipeline.experiments.state import oof_scores
from pipeline.inference.predictor import CheckpointPredictor


@dataclass(frozen=True)
class PredictJob:
    """What one experiment predicts with: its TTA, where it runs, and the test set of now."""

    tta: TTAConfig
    device: str
    workers: int | None
    predict: PredictConfig
    test_ids: list[str]
    test_fingerprint: str

    @classmethod
    def of(cls, experiment: Config, test_ids: list[str], test_fingerprint: str) -> PredictJob:
        return cls(experiment.tta, experiment.train.device, experiment.train.workers,
                   experiment.predict, test_ids, test_fingerprint)


def predict_part(part: Part, job: PredictJob, data, valid: pd.DataFrame | None,
                 *, force: bool, scorer: Scorer) -> dict | None:
    """Predict the test set (and the validation rows) with part.best, unless current.

    Stale predictions (a retrained checkpoint, a changed test set, other TTA settings) are
    simply made again: nothing is lost. Returns the row of the stage's table (rank 0), or None.
    """
    inputs = predict_inputs(part, job.tta, job.test_fingerprint, valid)
    details = {"tta": job.tta.model_dump(), "test images": len(job.test_ids)}
    step = Step("predict", part.predict_manifest, inputs, details, part.predicted_outputs,
                lambda: _predict(part, job, data, valid, scorer=scorer),
                current=f"{part.dir}: predictions are current (FORCE=1 redoes them)",
                redo=f"{part.dir}: predicting again: {{why}}")
    return run_step(step, force)


def _predict(part: Part, job: PredictJob, data, valid: pd.DataFrame | None,
             *, scorer: Scorer) -> dict | None:
    """Every rank predicts its shard of the images; rank 0 writes the probabilities."""
    predictor = CheckpointPredictor(part.best, job.tta, job.device, job.workers, job.predict)
    views = len(predictor.views)
    test = predictor.predict(test_image_paths(data, job.test_ids), f"{part.name} test x{views}")
    oof = None if valid is None else predictor.predict(
        train_image_paths(data, valid["id"].tolist()), f"{part.name} oof x{views}")
    if not distributed.is_main():
        return None  # the shards were gathered on rank 0, which writes
    classes = predictor.config.data.classes
    write_csv_atomic(probability_frame(job.test_ids, test.probs, classes, grade=test.grade),
                     part.test_probs)
    result = {"run": part.name, "views": views, "test images": len(job.test_ids)}
    if valid is not None:
        write_csv_atomic(probability_frame(valid["id"], oof.probs, classes, valid["label"],
                                           grade=oof.grade), part.oof_tta)
        targets = valid["target"].to_numpy()
        result[f"oof {scorer.metric}"] = scorer.score(targets, scorer.probs_of(read_probs(part.oof)))
        result[f"oof {scorer.metric} tta"] = scorer.score(targets, oof.probs)
    return result


def predict_experiment(experiment: Config, layout: Layout, folds: pd.DataFrame,
                       folds_to_predict: list[int] | None, *, force: bool,
                       test: tuple[list[str], str]) -> None:
    """Predict every current fold of an experiment (or the chosen ones); a fold not trained under
    the inputs of now is refused: its predictions would not belong to this experiment."""
    exp = layout.experiment(experiment.run_name)
    with stage_lock(exp.lock, exp.dir, "predicted"):
        _predict_folds(experiment, layout, folds, folds_to_predict, force=force, test=test)


def _predict_folds(experiment: Config, layout: Layout, folds: pd.DataFrame,
                   folds_to_predict: list[int] | None, *, force: bool,
                   test: tuple[list[str], str]) -> None:
    name = experiment.run_name
    refuse_stale_folds(experiment, folds, layout, folds_to_predict)
    trained = current_folds(experiment, folds, layout)
    if not trained:
        raise PipelineError(f"no current trained folds in {layout.experiment(name).dir}: run "
                            f"`{make_command('train', experiment.data.name, MODEL=name)}` first "
                            f"(`{make_command('runs', experiment.data.name)}` shows what is stale "
                            f"and why)")
    selected = trained if folds_to_predict is None else folds_to_predict
    untrained = sorted(set(selected) - set(trained))
    if untrained:
        remedy = make_command("train", experiment.data.name, MODEL=name,
                              FOLDS=",".join(map(str, untrained)))
        raise PipelineError(f"fold(s) {untrained} of {name} are not trained under the "
                            f"current inputs: run `{remedy}` first")
    exp, scorer = layout.experiment(name), Scorer.of(experiment.data)
    job = PredictJob.of(experiment, *test)
    results = [predict_part(exp.fold(k), job, experiment.data, folds[folds["fold"] == k],
                            force=force, scorer=scorer) for k in selected]
    show_table([r for r in results if r])
    on_main(lambda: print_tta_gain(exp, trained, experiment.tta, scorer))


def refuse_stale_folds(experiment: Config, folds: pd.DataFrame, layout: Layout,
                       chosen: list[int] | None) -> None:
    """A trained fold that is no longer current (its best.pt modified, its inputs changed) is an
    error naming it, not a fold silently left unpredicted."""
    inputs, details = training_inputs(experiment, folds, layout)
    exp = layout.experiment(experiment.run_name)
    stale = [(k, fresh) for k in (chosen or fold_numbers(folds))
             if (fresh := train_freshness(exp.fold(k), inputs, details)).state == "stale"]
    if stale:
        lines = "\n  ".join(f"fold {k}: {fresh.why()}" for k, fresh in stale)
        remedy = make_command("train", experiment.data.name, MODEL=exp.name,
                              FOLDS=",".join(str(k) for k, _ in stale), FORCE=1)
        raise PipelineError(f"{exp.dir}: trained fold(s) are stale, nothing was predicted:\n  "
                            f"{lines}\n`{remedy}` retrains them")


def print_tta_gain(exp: Experiment, folds: list[int], tta: TTAConfig, scorer: Scorer) -> None:
    """The out-of-fold score over every predicted fold, without and with TTA."""
    if not folds or not all(exp.fold(k).oof_tta.is_file() for k in folds):
        return
    metric = scorer.metric
    plain, with_tta = oof_scores(exp, folds, scorer)
    if tta.views == "none":
        log.info(f"{exp.name}: out-of-fold {metric} {plain:.4f} (tta.views=none; TTA=flips, d4, "
              f"shifts or scales tries test-time augmentation)")
        return
    log.info(f"{exp.name}: out-of-fold {metric} {plain:.4f} without TTA, {with_tta:.4f} with "
          f"{tta.views} TTA ({with_tta - plain:+.4f})")
