"""train.time_budget (BUDGET= minutes a fold): the epochs that fit, from a timing probe.

    config = budgeted(config, layout, folds)    # train.epochs set from the budget, recorded

Before the first fold trains, a probe runs a few optimiser steps of the real model, data,
precision and device on fold 0's training rows (the trainer's own step, after two steps of
warm-up: cuDNN's autotuning, the loader's workers starting), and an epoch's seconds follow:
the training batches of an epoch at that pace, plus validation, whose forward pass without
gradients costs about a third of a training step per image. The epochs that fit the budget,
with BUDGET_SHARE of it kept for the rest of a fold (the validation fold's predictions, the
plots, the checkpoints), become train.epochs: printed, recorded in budget.json
(pipeline/experiments/budgets.py), and part of the fold's training settings like any epochs.
The learning-rate schedule then fits that number; early stopping still applies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

from pipeline.base import distributed
from pipeline.base.config import Config
from pipeline.base.log import log
from pipeline.base.utils import PipelineError, make_command
from pipeline.experiments.budgets import read_budget, with_budget, write_budget
from pipeline.experiments.layout import Layout
from pipeline.inference.engine import clean_image_errors
from pipeline.training.loop import training_batches
from pipeline.training.parts import RunSpec
from pipeline.training.run import make_trainer

WARMUP_STEPS, PROBE_STEPS = 2, 6
BUDGET_SHARE = 0.9  # of the budget for the epochs; the rest for what a fold does after them
VALIDATION_COST = 1 / 3  # a forward pass without gradients, per image, against a training step
MAX_BUDGET_EPOCHS = 300  # a budget far beyond what the data needs: early stopping ends it


def budgeted(config: Config, layout: Layout, *, probe: Callable[[Config], float]) -> Config:
    """`config` with train.epochs from its time budget: the recorded epochs, else measured
    now by `probe` (an epoch's seconds; every rank probes together under torchrun, rank 0
    records)."""
    budget = config.train.time_budget
    if budget is None:
        return config
    if "train.epochs" in explicit_keys(config.overrides):
        raise PipelineError(f"train.time_budget={budget:g} chooses the epochs; train.epochs="
                            f"{config.train.epochs} names them too: drop one (EPOCHS= or BUDGET=)")
    exp = layout.experiment(config.run_name)
    recorded = read_budget(exp)
    if recorded is not None and recorded.get("time_budget") == budget:
        return with_budget(config, layout)
    seconds = distributed.broadcast_from_main(probe(config))
    epochs = max(1, min(MAX_BUDGET_EPOCHS, math.floor(budget * 60 * BUDGET_SHARE / seconds)))
    log.info(f"train.time_budget {budget:g} min a fold: an epoch takes about {seconds:.1f} s "
             f"here, so {epochs} epoch(s) (recorded in {exp.budget})")
    if epochs == 1 and budget * 60 * BUDGET_SHARE < seconds:
        log.info(f"note: one epoch takes longer than the budget; "
                 f"{make_command('train', config.data.name, MODEL=config.run_name)} with a "
                 f"larger BUDGET= (or a smaller augment.image_size) fits more")
    if distributed.is_main():
        exp.dir.mkdir(parents=True, exist_ok=True)
        write_budget(exp, {"time_budget": budget, "epochs": epochs,
                           "seconds_per_epoch": round(seconds, 2), "device": device_name(),
                           "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    distributed.barrier()
    return with_budget(config, layout)


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
