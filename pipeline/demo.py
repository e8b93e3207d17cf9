"""The whole chain on the embedded demo competition, for one model.

    python -m pipeline demo --model resnet18        # make demo   (make install demo on a fresh machine)

Exports scikit-learn's handwritten digits as a Kaggle-style competition (data/digits), then runs
folds, train, predict (TTA), refit and ensemble, and scores the submission against the held-out
labels (data/digits/solution.csv), as a leaderboard would. Each stage skips work that is already
done, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import time

from pipeline.base.config import load_config
from pipeline.base.log import log
from pipeline.base.utils import PipelineError, format_table
from pipeline.experiments.freshness import read_folds, read_test_set
from pipeline.experiments.layout import Layout
from pipeline.inference.experiment import predict_experiment
from pipeline.stages.demo_data import export_digits
from pipeline.stages.ensemble import ensemble_runs
from pipeline.stages.folds import make_folds
from pipeline.stages.refit import run_refit
from pipeline.stages.report import build_report
from pipeline.training.experiment import train_folds


def banner(text: str) -> None:
    log.info(f"\n== {text} " + "=" * max(0, 70 - len(text)))


def run_demo(model: str, data: str, overrides: list[str], force: bool,
             *, name: str | None = None) -> dict:
    started = time.perf_counter()
    config = load_config(data, model, overrides, name=name)
    if config.data.solution_csv is None:
        raise PipelineError(f"the demo needs a competition with held-out labels (solution_csv); "
                            f"{config.data.name} has none. Use the stages one by one instead.")

    banner("demo-data: export the digits competition")
    export_digits(config.data.root_path)
    banner("folds")
    layout = Layout.of(config)
    make_folds(config, force=force)
    banner(f"train {config.run_name} on {config.folds.n_splits} folds")
    train_folds(config, layout, None, force)
    banner(f"predict the test set (TTA: {config.tta.views})")
    predict_experiment(config, layout, read_folds(config.data, config.folds, layout), None, force=force,
                       test=read_test_set(config.data))
    banner("refit on all labelled rows")
    refit = run_refit(config, force)
    banner("ensemble folds + refit, write the submission")
    outcome = ensemble_runs(config, [config.run_name], overrides=overrides)
    banner("report: the competition's HTML pages")
    page = build_report(load_config(data, None, overrides))

    minutes = (time.perf_counter() - started) / 60
    metric = config.data.metric
    rows = [
        ["cross-validation (out-of-fold, TTA)", f"{outcome.cv_score:.4f}"],
        ["held-out test, ensemble", f"{outcome.solution_score:.4f}"],
        ["held-out test, refit alone", f"{refit.get(f'test {metric}', float('nan')):.4f}"],
        ["submission", str(outcome.submission)],
        ["submission report", str(outcome.report)],
        ["HTML report", str(page)],
        ["runs", str(layout.experiment(config.run_name).dir)],
        ["minutes", f"{minutes:.1f}"],
    ]
    banner(f"demo finished: {config.run_name} on {config.data.name} ({metric})")
    log.info(format_table(rows, ["", ""]))
    return {"cv": outcome.cv_score, "test": outcome.solution_score, "minutes": minutes,
            "report": page}


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "model", "name", "force", "overrides")


def main(args) -> None:
    run_demo(args.model or "resnet18", args.data, args.overrides, args.force, name=args.name)
