"""Test-time-augmented inference of each fold's best checkpoint.

    python -m pipeline predict --data digits --model resnet18 [--folds 0,2] [tta.views=d4]
    make predict MODEL=resnet18 [TTA=d4]

For fold k: predicts the test set (runs/<competition>/<experiment>/fold<k>/test_probs.csv) and,
again, its own validation fold (oof_tta.csv), so the out-of-fold score with and without TTA can be
compared; predict.manifest.json records the checkpoint, test set and TTA settings they were made
from, so a retrained fold, a new test image or new TTA settings are predicted again. TTA
settings are read at predict time: a new `TTA=` needs no retraining. How the views are made and
reduced: pipeline/inference/predictor.py.
"""

from __future__ import annotations

from pipeline.base import distributed
from pipeline.base.utils import PipelineError, make_command
from pipeline.experiments.freshness import read_folds, read_test_set
from pipeline.experiments.layout import Layout
from pipeline.experiments.state import experiment_configs
from pipeline.inference.engine import resolve_device
from pipeline.inference.experiment import predict_experiment

# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "model", "models", "keep_going", "folds", "name", "seeds", "force", "overrides")


def main(args) -> None:
    if args.model is None:
        example = make_command("predict", args.data, MODEL="resnet18")
        raise PipelineError(f"predict needs a model: {example}")
    for config in experiment_configs(args.data, args.model, args.overrides, args.name,
                                     seeds=args.seeds):
        layout = Layout.of(config)
        with distributed.session(resolve_device(config.train.device)):
            folds = read_folds(config.data, config.folds, layout)
            predict_experiment(config, layout, folds, args.folds, force=args.force,
                               test=read_test_set(config.data))
