"""A learning-rate sweep on fold 0: the loss curve, a suggested train.lr, the command using it.

    make lr MODEL=resnet18 [STEPS=100] [START=1e-7] [END=10] [ARGS="train.batch_size=32 ..."]
    python -m pipeline lr --model resnet18 [--steps 100] [--start 1e-7] [--end 10] [--force]

Trains the experiment's model on fold 0's training rows for --steps optimiser steps, the
learning rate growing exponentially from --start to --end (training/lr_finder.py), and stops
early once the loss blows up. Writes runs/<competition>/<experiment>/lr_sweep.csv and
lr_sweep.png (the report's experiment page shows it) and their manifest; a sweep of the same
inputs is current and not run again (FORCE=1 does). Nothing of the experiment's folds is
touched. The suggestion is where the smoothed loss falls fastest: a starting point for
`train.lr`, not a verdict; the CV of the run it starts decides.
"""

from __future__ import annotations

from pipeline.base.log import log
from pipeline.base.utils import format_table, make_command
from pipeline.experiments.layout import Layout
from pipeline.experiments.state import load_experiment
from pipeline.training.lr_finder import suggestion, sweep_experiment

# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "model", "name", "steps", "lr_start", "lr_end", "force", "overrides")


def main(args) -> None:
    config = load_experiment(args.data, args.model or "resnet18", args.overrides, args.name)
    layout = Layout.of(config)
    frame = sweep_experiment(config, layout, start=args.lr_start, end=args.lr_end,
                             steps=args.steps, force=args.force)
    suggested = suggestion(frame)
    lowest = frame.loc[frame["smoothed"].idxmin()]
    rows = [["steps", f"{len(frame)} of {args.steps} (batch {config.train.batch_size})"],
            ["learning rates", f"{frame['lr'].iloc[0]:.2g} .. {frame['lr'].iloc[-1]:.2g}"],
            ["lowest smoothed loss", f"{lowest['smoothed']:.4f} at {lowest['lr']:.2g}"],
            ["train.lr now", f"{config.train.lr:g}"],
            ["suggested train.lr", f"{suggested:.2g} (the steepest fall)"],
            ["curve", str(layout.experiment(config.run_name).lr_sweep_png)]]
    log.info(format_table(rows, ["lr sweep", config.run_name]))
    extra = " ".join([*args.overrides, f"train.lr={suggested:.2g}"])
    model = args.model or "resnet18"
    log.info(f"to train with it: {make_command('train', config.data.name, MODEL=model, ARGS=extra)}")
