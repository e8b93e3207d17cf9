"""An Optuna search over an experiment's settings (pipeline/training/tuning.py).

    make tune MODEL=resnet18 TRIALS=20          # resumable: run it again to go on
    make tune MODEL=resnet18 TRIALS=20 NAME=resnet18-tuned   # the best settings under a name
    make tune MODEL=resnet18 TRIALS=40 TUNE_STORAGE=postgresql://...   # several machines
    python -m pipeline tune --data digits --model resnet18 --trials 20

Each trial trains fold 0 of an experiment of its own (<m>-tune-<digest>), pruned on its
learning curve; at the end the table of trials and each setting's importance
(runs/<competition>/tune/<m>/trials.csv, importance.csv), then the best trial's experiment
(or NAME=, which takes over the trial's fold 0) trains its other folds: its fold-0 score is
optimistic (the best of n on the fold that chose it), its other folds' CV honest, and both are
printed, labelled. Fold 0 is recorded as the search's (search.json): `make runs`, the summary
and the ensemble leave it out of the CV they print.
"""

from __future__ import annotations

from pipeline.base.log import log
from pipeline.base.utils import PipelineError, make_command
from pipeline.training.tuning import SEARCHED_FOLD, promote, tune, write_tables

# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "model", "name", "trials", "overrides")


def main(args) -> None:
    if args.model is None:
        raise PipelineError(f"tune needs a model: {make_command('tune', args.data, MODEL='resnet18')}")
    study, search = tune(args.data, args.model, args.overrides, trials=args.trials)
    table, _ = write_tables(study, search)
    if not (table["state"] == "complete").any():
        raise PipelineError(f"no trial of {args.model} completed (above: pruned or failed); "
                            f"see {search.layout.tune_trials(args.model)}")
    best = promote(study, search, args.name)
    metric, folds = search.metric, ",".join(map(str, best.folds))
    log.info(f"best trial: {best.experiment}")
    log.info(f"  fold {SEARCHED_FOLD} {metric} {best.search_score:.4f} (the search's: the best of "
             f"{best.trials} on the fold that chose it, optimistic)")
    log.info(f"  folds {folds} {metric} {best.honest:.4f} ± {best.honest_std:.4f} (honest: "
             f"folds no trial scored)")
    log.info(f"next: {make_command('predict ensemble', search.layout.competition, MODEL=best.experiment)}")
