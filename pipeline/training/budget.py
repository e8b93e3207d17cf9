"""train.time_budget (BUDGET= minutes a fold): the epochs that fit, from a timing probe.

    config = budgeted(config, layout, folds)    # train.epochs set from the budget, recorded

Before the first fold trains, a probe runs a few optimiser steps of the real model, data,
precision and device on fold 0's training rows (the trainer's own step, after two steps of
warm-up: cuDNN's autotuning, the loader's workers starting), and an epoch's seconds follow:
the training batches of an epoch at that pace, plus validation, whose forward pass without
gradients costs about a third of a training step per image. The epochs that fit the budget,
with BUDGET_SHARE of it kept for the rest of a fold (the validation fold's predictions, the
plots, the checkpoints), become train.epochs: printed, recorded in budget.json with the settings
they were measured under (pipeline/experiments/budgets.py; another image size or model measures
again), and part of the fold's training settings like any epochs. An experiment that differs
from one measured before only in its seed (or epochs, or budget) takes that measurement on the
same device (`sibling_record`): SEEDS= then train every seed for the same epochs.
The learning-rate schedule then fits that number; early stopping still applies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch

from pipeline.base import distributed
from pipeline.base.config import Config
from pipeline.base.log import log
from pipeline.base.utils import PipelineError, make_command
from pipeline.experiments.budgets import (
    budget_key,
    matching_record,
    pace_key,
    sibling_record,
    with_epochs,
)
from pipeline.experiments.layout import Layout
from pipeline.inference.engine import clean_image_errors
from pipeline.training.loop import training_batches
from pipeline.training.parts import RunSpec
from pipeline.training.run import make_trainer

WARMUP_STEPS, PROBE_STEPS = 2, 6
BUDGET_SHARE = 0.9  # of the budget for the epochs; the rest for what a fold does after them
VALIDATION_COST = 1 / 3  # a forward pass without gradients, per image, against a training step
MAX_BUDGET_EPOCHS = 300  # a budget far beyond what the data needs: early stopping ends it


def budgeted(config: Config, layout: Layout, *,
             probe: Callable[[Config], float]) -> tuple[Config, dict[str, Any] | None]:
    """(`config` with train.epochs from its time budget, the record to write once the training
    plan is accepted: None when it was recorded before). Measured by `probe` (an epoch's
    seconds) when no record of this budget under these settings exists; under torchrun every
    rank probes together and takes rank 0's measurement."""
    budget = config.train.time_budget
    if budget is None:
        return config, None
    if "train.epochs" in explicit_keys(config.overrides):
        raise PipelineError(f"train.time_budget={budget:g} chooses the epochs; train.epochs="
                            f"{config.train.epochs} is set too (EPOCHS=, ARGS=, or the "
                            f"experiment's overrides): leave one of them out")
    recorded = matching_record(config, layout)
    if recorded is not None:
        return with_epochs(config, int(recorded["epochs"])), None
    # rank 0's answer on every rank: the probe that follows without one is collective
    world = distributed.world_size()
    sibling = distributed.broadcast_from_main(sibling_record(config, layout, device_name(),
                                                             world))
    if sibling is not None:
        seconds = float(sibling[0]["seconds_per_epoch"])
    else:
        seconds = distributed.broadcast_from_main(probe(config))
    epochs = max(1, min(MAX_BUDGET_EPOCHS, epochs_within(budget, seconds)))
    if sibling is not None and sibling[0].get("time_budget") == budget:
        epochs = int(sibling[0]["epochs"])  # the same budget: the same epochs, to the epoch
    exp = layout.experiment(config.run_name)
    where = f"as measured for {sibling[1]}" if sibling else "here"
    log.info(f"train.time_budget {budget:g} min a fold: an epoch takes about {seconds:.1f} s "
             f"{where}, so {epochs} epoch(s) (recorded in {exp.budget})")
    if epochs_within(budget, seconds) < 1:
        log.info(f"note: one epoch takes longer than the budget; "
                 f"{make_command('train', config.data.name, MODEL=config.run_name)} with a "
                 f"larger BUDGET= (or a smaller augment.image_size) fits more")
    record = {"time_budget": budget, "epochs": epochs, "seconds_per_epoch": round(seconds, 4),
              "settings": budget_key(config), "pace": pace_key(config, world),
              "device": device_name(),
              "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return with_epochs(config, epochs), record


def epochs_within(budget: float, seconds: float) -> int:
    """The whole epochs of `seconds` each that fit a fold's budget of `budget` minutes, the
    rest of the fold kept aside (0: not even one)."""
    return math.floor(budget * 60 * BUDGET_SHARE / seconds)


def explicit_keys(overrides: list[str]) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in overrides if "=" in item}


def epoch_seconds(config: Config, spec: RunSpec) -> float:
    """An epoch's seconds of the run `spec` at the pace of PROBE_STEPS measured steps."""
    trainer = make_trainer(config, spec)
    trainer.state.micro_batch = trainer.micro_batch
    loaded = training_batches(trainer, WARMUP_STEPS + PROBE_STEPS)
    with clean_image_errors():
        for _ in range(WARMUP_STEPS):
            trainer.train_step(*next(loaded))
        synchronize(trainer.parts.device)
        started = time.perf_counter()
        for _ in range(PROBE_STEPS):
            trainer.train_step(*next(loaded))
        synchronize(trainer.parts.device)
    per_batch = (time.perf_counter() - started) / PROBE_STEPS
    batches = trainer.parts.steps_per_epoch * config.train.accumulate
    valid_batches = len(spec.valid_rows.ids) / max(config.train.batch_size, 1)
    return per_batch * (batches + VALIDATION_COST * valid_batches)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
