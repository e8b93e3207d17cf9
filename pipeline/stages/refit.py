"""Full-data refit: train on every labelled row for a fixed number of epochs, predict the test set.

    python -m pipeline refit --data digits --model resnet18 [refit.epochs=12]
    make refit MODEL=resnet18

The epoch count comes from cross-validation: the median of the folds' best epochs (from their
log.csv), unless `refit.epochs` is set. The learning rate walks the path the folds walked up to
that epoch (training/lr_path.FoldPath): the folds' warm-up, milestones and cosine length, not a schedule
squeezed into the refit's fewer epochs; each refit epoch has K/(K-1) times the folds' steps.
Without a validation set nothing can pick a best epoch, so the model of the last epoch is the
result. Writes runs/<competition>/<model>/full/ (config.yaml, best.pt = the last epoch, last.pt,
log.csv, test_probs.csv with the configured TTA, train.manifest.json and predict.manifest.json)
and a submission of its own, submissions/<competition>/<model>_refit.csv. A refit made from other
inputs (settings, rows, epoch count) is refused; FORCE=1 retrains it. `make ensemble` joins the
refit to the model's folds with weight `ensemble.refit_weight`, and names it as unvalidated: no
fold scored it.
"""

from __future__ import annotations

import pandas as pd

from pipeline.base import distributed
from pipeline.base.config import Config, DataConfig
from pipeline.base.fingerprints import fingerprint
from pipeline.base.log import log
from pipeline.base.task import Scorer
from pipeline.base.utils import PipelineError, make_command
from pipeline.ensembling.submission import (
    build_submission,
    score_against_solution,
    write_submission,
)
from pipeline.experiments.freshness import (
    RefitPlan,
    read_folds,
    read_test_set,
    refit_plan,
)
from pipeline.experiments.layout import Layout, Part
from pipeline.experiments.probfiles import read_probs
from pipeline.experiments.runner import Step, run_step, show_table, stage_lock
from pipeline.experiments.state import experiment_configs
from pipeline.inference.engine import resolve_device
from pipeline.inference.experiment import PredictJob, predict_part
from pipeline.training.experiment import pseudo_rows, start_experiment, training_rows
from pipeline.training.parts import Rows, RunSpec
from pipeline.training.run import preflight, train_part

REFIT_SEED_OFFSET = 1000  # the refit's seed differs from every fold's (seed + fold)


def refit_config(config: Config, epochs: int) -> Config:
    """The fold runs' config for `epochs` epochs, without early stopping (nothing to validate)."""
    train = config.train.model_copy(update={"epochs": epochs, "early_stopping": 0})
    return config.model_copy(update={"train": train})


def train_refit(config: Config, layout: Layout, folds: pd.DataFrame, plan: RefitPlan,
                *, force: bool) -> Part:
    """Train on all labelled rows for the plan's epochs, on the folds' learning-rate path."""
    refit = refit_config(config, plan.epochs)
    part = layout.experiment(config.run_name).refit
    spec = RunSpec(part=part, train_rows=Rows.of(training_rows(folds, config.train.exclude)),
                   valid_rows=None, seed=config.train.seed + REFIT_SEED_OFFSET, tag=part.name,
                   inputs=plan.inputs, path=plan.path, micro_batches=layout.micro_batches,
                   pseudo=lambda: pseudo_rows(config.data, config.train.pseudo, layout, part.name))
    train_part(refit, spec, {**plan.details, "rows": len(folds), "unvalidated": True}, force,
               what=f"the refit {part.dir}", stage="refit",
               before=lambda: preflight(refit, layout))
    return part


def refit_submission_step(data: DataConfig, name: str, layout: Layout, part: Part,
                          *, test_ids: list[str]) -> Step:
    """submissions/<competition>/<experiment>_refit.csv: the refit alone (unvalidated); written
    again each time (it is cheap), by rank 0."""
    submission = layout.refit_submission(name)

    def work() -> dict:
        probs = Scorer.of(data).probs_of(read_probs(part.test_probs))
        frame = build_submission(data, test_ids, probs)
        path = write_submission(frame, submission.csv, data)
        result = {"run": name, "submission": str(path)}
        test_score = score_against_solution(data, frame)
        if test_score is not None:
            result[f"test {data.metric}"] = test_score
        return result

    return Step("submission", submission.manifest,
                {"members": fingerprint({"refit": part.predict_manifest.read_text()})},
                {"members": [name], "refit only": True, "unvalidated": True},
                lambda: [submission.csv], work, current="", main_only=True)


def run_refit(config: Config, force: bool) -> dict:
    """Refit on all labelled rows and predict the test set, one process at a time on the
    experiment; returns the row of the stage's table (rank 0)."""
    layout = Layout.of(config)
    exp = layout.experiment(config.run_name)
    with stage_lock(exp.lock, exp.dir, "refitted"):
        return _refit(config, layout, force)


def _refit(config: Config, layout: Layout, force: bool) -> dict:
    folds = read_folds(config.data, config.folds, layout)
    plan = refit_plan(config, folds, layout)
    log.info(f"{config.run_name}: refit on all labelled rows for {plan.epochs} epochs "
             f"({plan.source}), walking the folds' learning-rate path to their epoch "
             f"{plan.path.until:g} of {plan.path.epochs}")
    start_experiment(config, layout.experiment(config.run_name))  # not the refit's epoch count
    part = train_refit(config, layout, folds, plan, force=force)
    test_ids, test_fingerprint = read_test_set(config.data)
    job = PredictJob.of(config, test_ids, test_fingerprint)
    predict_part(part, job, config.data, None, force=force, scorer=Scorer.of(config.data))
    step = refit_submission_step(config.data, config.run_name, layout, part, test_ids=test_ids)
    result = run_step(step, force=True)
    if result is None:
        return {}  # not rank 0
    result = {"run": result.pop("run"), "epochs": plan.epochs, **result}
    show_table([result])
    log.info("note: a refit has no validation fold: its score is unknown (unvalidated)")
    return result


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "model", "models", "keep_going", "name", "seeds", "force", "overrides")


def main(args) -> None:
    if args.model is None:
        example = make_command("refit", args.data, MODEL="resnet18")
        raise PipelineError(f"refit needs a model: {example}")
    for config in experiment_configs(args.data, args.model, args.overrides, args.name,
                                     seeds=args.seeds):
        with distributed.session(resolve_device(config.train.device)):
            run_refit(config, args.force)
