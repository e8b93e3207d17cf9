"""The learning-rate finder: a short sweep of the learning rate, growing exponentially step by
step, on fold 0's training rows, with the loss at each step (fastai's `lr_find`, Lightning's
`Tuner.lr_find`, after Smith 2015, "Cyclical learning rates").

    frame = sweep(config, spec, start=1e-7, end=10, steps=100)   # lr, loss, smoothed
    lr = suggestion(frame)     # the steepest fall of the smoothed loss, before its minimum
    frame = sweep_experiment(config, layout, start=..., end=..., steps=..., force=False)
                               # `make lr`: fold 0's sweep, its files and manifest

The sweep trains the real model, loss, precision and batches of the experiment (the trainer's
own step), from the weights a fold starts from, and writes nothing: the experiment's folds are
untouched. Only the learning rate differs: it multiplies every parameter group's (the body's
`train.body_lr_mult` kept), starting at `start` and ending at `end`; and the whole model
trains from the first step (train.head_only_epochs' frozen body is no part of a sweep).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from pipeline.base.config import Config
from pipeline.base.fingerprints import fingerprint
from pipeline.base.utils import PipelineError, write_csv_atomic
from pipeline.experiments.freshness import read_folds, training_inputs
from pipeline.experiments.layout import Experiment, Layout
from pipeline.experiments.runner import Step, run_step, stage_lock
from pipeline.inference.engine import clean_image_errors, progress
from pipeline.reporting import plots
from pipeline.training.experiment import fold_spec
from pipeline.training.loop import training_batches
from pipeline.training.parts import RunSpec
from pipeline.training.run import make_trainer

SMOOTHING = 0.98  # the loss's exponential moving average (fastai's and Lightning's beta)
DIVERGED = 4.0  # the sweep stops once the smoothed loss passes this many times its lowest
SKIP_START = 0.1  # the first tenth of the sweep: the average has not settled yet


def sweep(config: Config, spec: RunSpec, *, start: float, end: float,
          steps: int) -> pd.DataFrame:
    """One row per optimiser step (train.accumulate loaded batches, as in training): the
    learning rate `train.lr` stood for at that step, the step's loss and its smoothed
    (bias-corrected) average."""
    if not 0 < start < end:
        raise PipelineError(f"the sweep runs from start to end: 0 < start < end (got {start:g} "
                            f"to {end:g})")
    trainer = make_trainer(config, spec)
    parts, lr = trainer.parts, config.train.lr
    growth = (end / start) ** (1 / max(steps - 1, 1))
    parts.scheduler = torch.optim.lr_scheduler.LambdaLR(
        parts.optimizer, lambda step: start * growth ** min(step, steps - 1) / lr)
    trainer.state.micro_batch = trainer.micro_batch
    rows, average, lowest = [], 0.0, math.inf
    bar = progress(range(steps), f"{spec.tag} learning-rate sweep")
    accumulate = config.train.accumulate
    loaded = training_batches(trainer, steps * accumulate)
    with clean_image_errors():
        for index in range(steps):
            at = start * growth ** index  # what the step trains at (its scheduler's factor)
            loss = sum(float(trainer.train_step(*next(loaded), first=part == 0,
                                                last=part == accumulate - 1))
                       for part in range(accumulate)) / accumulate
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            smoothed = average / (1 - SMOOTHING ** (index + 1))
            rows.append({"lr": at, "loss": loss, "smoothed": smoothed})
            bar.update()
            lowest = min(lowest, smoothed)
            if not math.isfinite(loss) or smoothed > DIVERGED * lowest:
                break
    bar.close()
    return pd.DataFrame(rows)


def sweep_experiment(config: Config, layout: Layout, *, start: float, end: float, steps: int,
                     force: bool) -> pd.DataFrame:
    """`make lr`: the sweep of fold 0's training rows written as the experiment's
    lr_sweep.csv and lr_sweep.png, with a manifest of what made them (the fold's training
    inputs and the sweep's settings): swept again only when they changed (or FORCE=1)."""
    exp, settings = layout.experiment(config.run_name), {"steps": steps, "start": start, "end": end}
    with stage_lock(exp.lock, exp.dir, "swept"):  # the lock, then the inputs (the runner's order)
        folds = read_folds(config.data, config.folds, layout)
        inputs, details = training_inputs(config, folds, layout)
        inputs["sweep"] = fingerprint(settings)
        spec = fold_spec(config, layout, folds, 0, inputs=inputs)
        run_step(sweep_step(config, exp, spec, details={**details, "sweep": settings},
                            start=start, end=end, steps=steps), force)
    return pd.read_csv(exp.lr_sweep_csv)


def sweep_step(config: Config, exp: Experiment, spec: RunSpec, *, details: dict, start: float,
               end: float, steps: int) -> Step:
    """The sweep as the runner's step: its work, outputs and manifest."""

    def work() -> None:
        frame = sweep(config, spec, start=start, end=end, steps=steps)
        write_csv_atomic(frame, exp.lr_sweep_csv)
        plots.write_lr_sweep(frame, suggestion(frame), config.train.lr, exp.lr_sweep_png)

    return Step("lr_sweep", exp.lr_sweep_manifest, spec.inputs, details,
                lambda: [exp.lr_sweep_csv, exp.lr_sweep_png], work,
                current=f"{config.run_name}: its sweep is current ({exp.lr_sweep_png}); FORCE=1 "
                        f"sweeps again", all_or_none=True)


def suggestion(frame: pd.DataFrame) -> float:
    """The learning rate where the smoothed loss falls fastest (per decade of learning rate),
    between the sweep's first tenth and the loss's lowest point: Lightning's suggestion, which
    fastai calls `steep`."""
    first = int(len(frame) * SKIP_START)  # one lucky first batch is no lowest point
    lowest = first + int(frame["smoothed"].to_numpy()[first:].argmin())
    if lowest - first < 3:
        raise PipelineError(f"the loss did not fall during the sweep (lowest at step "
                            f"{lowest + 1} of {len(frame)}): start it lower (make lr START=1e-8) "
                            f"or give it more steps (STEPS=300)")
    lrs = frame["lr"].to_numpy()
    slope = np.gradient(frame["smoothed"].to_numpy(), np.log10(lrs))  # central differences
    return float(lrs[first + slope[first:lowest].argmin()])
